"""Overlays in bounded parts: the cut covers every picture once within its budget, and changes no bit; the
registration is grid_sample's bilinear, and the blend is within one step of the exact one."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from hirescam_cli import render
from hirescam_cli.modalities.image_overlays import covered, register

sizes = st.lists(st.tuples(st.integers(1, 60), st.integers(1, 60)), min_size=1, max_size=8)


@given(sizes, st.integers(0, 12), st.integers(1, 20_000))
def test_parts_cover_every_picture_once_in_order_within_the_budget(shapes, channels, budget):
    parts = render.plan_parts(shapes, channels, budget)
    covered = [(i, c) for rows, part in parts for i in rows for c in part]
    assert covered == [(i, c) for i in range(len(shapes)) for c in range(channels)]

    def padded(rows: range) -> int:
        return max(shapes[i][0] for i in rows) * max(shapes[i][1] for i in rows)

    for k, (rows, part) in enumerate(parts):
        # within the budget, counted padded to the part's largest picture, unless it is a single picture
        assert len(rows) * len(part) * padded(rows) <= budget or (len(rows), len(part)) == (1, 1)
        if len(rows) > 1:
            assert part == range(channels)  # images together only with all their channels
        following = parts[k + 1][0] if k + 1 < len(parts) else None
        if part == range(channels) and following and following.start == rows.stop:  # greedy: the next
            grown = range(rows.start, rows.stop + 1)  # image would not have fitted
            assert (len(rows) + 1) * channels * padded(grown) > budget


def test_parts_of_small_and_huge_images():
    small, huge = (480, 640), (2731, 4096)
    assert render.plan_parts([small] * 8, 2, 2**24) == [(range(8), range(2))]
    # all six methods, top-6: 36 x 307,200 = 11 M pixels per image, one image a part
    assert render.plan_parts([small] * 3, 36, 2**24) == [(range(i, i + 1), range(36)) for i in range(3)]
    cut = render.plan_parts([small, huge, small], 18, 2**24)
    assert cut[0] == (range(0, 1), range(18))
    assert cut[1:-1] == [(range(1, 2), range(c, c + 1)) for c in range(18)]  # one 11 M-pixel picture each
    assert cut[-1] == (range(2, 3), range(18))


def draw(maps, boxes, pictures, signed, rows_per_band=None):
    """Register and overlay maps (N, C, h, w) on pictures (N, 3, H, W), optionally band by band."""
    table = render.colormap_table("RdBu_r" if signed else "jet")
    positions = render.palette_positions(maps, signed)
    height, width = pictures.shape[2:]
    band = rows_per_band or height
    drawn = []
    for top in range(0, height, band):
        lines = range(top, min(height, top + band))
        registered = register(positions, boxes, lines, width)
        drawn.append(render.overlay(registered, pictures[:, :, top : lines.stop], table[None], 0.4))
    return torch.cat(drawn, 2)


def test_cutting_into_images_channels_and_bands_changes_no_bit():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand((3, 4, 7, 7), generator=generator) * 2 - 1
    boxes = torch.tensor([[3.5, -2.0, 40.25, 29.0], [0.0, 0.0, 37.0, 23.0], [-5.0, 4.0, 30.0, 31.0]])
    pictures = torch.randint(0, 256, (3, 3, 23, 37), dtype=torch.uint8, generator=generator)
    for signed in (False, True):
        whole = draw(maps, boxes, pictures, signed)
        assert whole.shape == (3, 4, 23, 37, 3) and whole.dtype == torch.uint8
        one_by_one = torch.stack(
            [torch.cat([draw(maps[i : i + 1, c : c + 1], boxes[i : i + 1], pictures[i : i + 1], signed)
                        for c in range(4)], 1)[0] for i in range(3)]
        )
        assert torch.equal(one_by_one, whole)
        assert torch.equal(draw(maps, boxes, pictures, signed, rows_per_band=5), whole)


def test_registration_is_grid_sample_bilinear_inside_the_box_and_zero_outside():
    generator = torch.Generator().manual_seed(1)
    maps = torch.rand((3, 2, 5, 7), generator=generator) * 4 - 2
    boxes = torch.tensor([[3.5, -2.0, 40.25, 29.0], [0.0, 0.0, 37.0, 23.0], [-5.0, 4.25, 30.0, 31.0]])
    rows, width = range(2, 23), 37
    xs = torch.arange(width) + 0.5
    ys = torch.arange(rows.start, rows.stop) + 0.5
    gx = 2 * (xs - boxes[:, :1]) / (boxes[:, 2:3] - boxes[:, :1]) - 1
    gy = 2 * (ys - boxes[:, 1:2]) / (boxes[:, 3:4] - boxes[:, 1:2]) - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    expected = torch.nn.functional.grid_sample(maps, grid, "bilinear", "border", align_corners=False)
    inside = (gx.abs() <= 1)[:, None, :] & (gy.abs() <= 1)[:, :, None]
    got = register(maps, boxes, rows, width)
    assert torch.equal(covered(boxes, rows, width), inside) and 0 < inside.sum() < inside.numel()
    scale = maps.abs().max()
    assert (got - expected).abs()[inside[:, None].expand_as(got)].max() <= 1e-6 * scale
    assert (got[~inside[:, None].expand_as(got)] == 0).all()


def test_overlay_is_within_one_step_of_the_exact_blend_for_every_pixel_and_colour():
    table = render.colormap_table("jet")
    grey = torch.full((1, 3), render.UNEXPLAINED, dtype=torch.uint8)
    colours = torch.cat([grey, table]).int()  # what positions 0 (unexplained) to 256 show
    for alpha in (0.0, 0.4, 0.5, 0.75, 1.0):
        # every picture value under every palette position: (1, 257, 1, 256) positions over (1, 3, 1, 256)
        positions = (torch.arange(257.0) + 0.5)[None, :, None, None].expand(1, 257, 1, 256)
        picture = torch.arange(256, dtype=torch.uint8).expand(1, 3, 1, 256)
        drawn = render.overlay(positions, picture, table[None], alpha)
        assert drawn.shape == (1, 257, 1, 256, 3) and drawn.dtype == torch.uint8
        weight = round(alpha * 128) / 128
        exact = picture.permute(0, 2, 3, 1)[:, None] * (1 - weight) + colours[None, :, None, None] * weight
        assert (drawn.float() - exact.round()).abs().max() <= 1  # within a step of the blend rounded once
        if alpha in (0.0, 1.0):
            assert torch.equal(drawn.float(), exact)


def test_palette_positions_pick_the_rounded_colormap_entry_and_leave_zero_for_grey():
    values = torch.tensor([0.0, 0.5 / 255, 0.49 / 255, 1.0, 0.5, float("nan"), 2.0, -1.0])
    assert render.palette_positions(values, signed=False).long().tolist() == [1, 2, 1, 256, 129, 1, 256, 1]
    signed = torch.tensor([-1.0, 0.0, 1.0])
    assert render.palette_positions(signed, signed=True).long().tolist() == [1, 129, 256]  # centre: entry 128
