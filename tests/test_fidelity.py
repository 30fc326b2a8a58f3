"""Layer-occlusion fidelity and identical-by-construction, on models whose used locations are known."""

import json
from pathlib import Path

import pytest
import torch
from determinism import noise, seeded
from test_cli import config, rgb, run
from tiny_models import gap_net, tiny_net, tiny_swin, tiny_vit
from torch import nn

from hirescam_cli import Explainer
from hirescam_cli.engine.diagnostics import constant_over_grid
from hirescam_cli.engine.layers import trace_layers
from hirescam_cli.engine.occlusion import occluded_copies
from hirescam_cli.metrics import fidelity, rank_correlation

SAMPLES = Path(__file__).parent.parent / "sample_images"


def planted_head(used: list[torch.Tensor]) -> nn.Module:
    """Input (B, 1, 5, 5) is the target map itself (an Identity layer); class c reads positions used[c]
    with distinct positive weights and ignores the rest: an affine head whose used set is known."""
    head = nn.Linear(25, len(used))
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(0.5)
        for c, positions in enumerate(used):
            head.weight[c, positions] = torch.arange(1, len(positions) + 1, dtype=torch.float32)
    return nn.Sequential(nn.Identity(), nn.Flatten(), head)


def occlusion_one_by_one(
    model: nn.Module, layer: str, x: torch.Tensor, classes: torch.Tensor
) -> torch.Tensor:
    """Delta computed the slow, obvious way: one forward per image and position, zeroing it in a hook."""
    module = dict(model.named_modules())[layer]
    with torch.no_grad():
        base = model(x).gather(1, classes)
        height, width = None, None
        grab = module.register_forward_hook(lambda _m, _i, out: setattr(module, "_shape", out.shape))
        model(x[:1])
        grab.remove()
        height, width = module._shape[-2:]
        delta = torch.empty(*classes.shape, height, width)
        for i in range(height):
            for j in range(width):

                def zero(_m, _i, out, i=i, j=j):
                    out = out.clone()
                    out[:, :, i, j] = 0
                    return out

                handle = module.register_forward_hook(zero)
                delta[:, :, i, j] = base - model(x).gather(1, classes)
                handle.remove()
    return delta


class SkipPastTheLayer(nn.Module):
    """A skip connection from below the target layer to above it: a larger batch after the layer
    cannot be added to it, so occlusion must fall back to repeating the input."""

    @seeded(1)
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))

    def forward(self, x):
        stem = self.stem(x)
        return self.head(self.block(stem) + stem)


def test_occluded_copies_are_image_major_with_one_position_zeroed_each():
    act = noise(2, 3, 2, 3)
    positions = torch.tensor([4, 0])
    copies = occluded_copies(act.flatten(2), positions).view(2, 3, 3, 2, 3)
    for image in range(2):
        assert torch.equal(copies[image, 0], act[image])
        for n, p in enumerate(positions.tolist()):
            expected = act[image].clone()
            expected[:, p // 3, p % 3] = 0
            assert torch.equal(copies[image, 1 + n], expected)


def test_hirescam_is_exactly_faithful_and_gradcam_mass_on_unused_is_the_known_value():
    used = [torch.tensor([0, 6, 12, 18, 24]), torch.tensor([2, 3, 7, 8, 9])]
    model = planted_head(used)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 5, 5, generator=generator) + 0.1  # positive activations everywhere
    with Explainer(model, "0") as explainer:
        result = explainer(x, classes=[0, 1])
        delta = explainer.occlusion(x, result.classes)
    for c, positions in enumerate(used):
        hires = fidelity(result.maps["hirescam"][:, c], delta[:, c])
        grad = fidelity(result.maps["gradcam"][:, c], delta[:, c])
        torch.testing.assert_close(hires["rank_correlation"], torch.ones(6))
        assert (hires["unused_mass"] == 0).all()
        assert (hires["missed_evidence"] == 0).all()  # 5 used positions = the top 20% of 25
        # Grad-CAM is mean(W_c) * A: its positive mass on a position is the activation's share there
        unused = torch.ones(25, dtype=torch.bool)
        unused[positions] = False
        flat = x.flatten(1)
        expected = flat[:, unused].sum(1) / flat.sum(1)
        torch.testing.assert_close(grad["unused_mass"], expected)
        assert (grad["unused_mass"] > 0.5).all()


def test_batched_occlusion_equals_one_position_at_a_time_for_any_chunk():
    model = tiny_net()
    x = noise(3, 3, 16, 16)
    classes = torch.tensor([[0, 2]] * 3)
    expected = occlusion_one_by_one(model, "3", x, classes)
    with Explainer(model, "3") as explainer:
        for chunk in (None, 100, 7):  # all images per forward; one image per forward; positions split
            delta = explainer.occlusion(x, classes, chunk=chunk)
            torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-5)
        assert explainer.occlusion_batched is True


def test_fallback_repeats_the_input_and_gives_the_same_delta():
    model = SkipPastTheLayer()
    x = noise(3, 3, 16, 16)
    classes = torch.tensor([[1]] * 3)
    expected = occlusion_one_by_one(model, "block", x, classes)
    with Explainer(model, "block") as explainer:
        delta = explainer.occlusion(x, classes)
        assert explainer.occlusion_batched is False
    torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-5)


def test_sampled_positions_are_measured_and_the_rest_are_nan():
    model = tiny_net()
    x = noise(2, 3, 16, 16)
    with Explainer(model, "3") as explainer:
        full = explainer.occlusion(x, 0)
        part = explainer.occlusion(x, 0, positions=torch.tensor([3, 10, 63]))
        assert explainer.occlusion(x, torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0, 8, 8)
        with pytest.raises(ValueError, match="distinct indices"):
            explainer.occlusion(x, 0, positions=torch.tensor([64]))
    measured = ~part.isnan()
    assert measured.flatten(2).sum(-1).eq(3).all()
    torch.testing.assert_close(part[measured], full[measured])


def test_rank_correlation_handles_ties_and_unmeasured_entries():
    a = torch.tensor([[1.0, 2.0, 2.0, 3.0, 100.0]])
    b = torch.tensor([[10.0, 20.0, 20.0, 30.0, -5.0]])
    valid = torch.tensor([[True, True, True, True, False]])
    assert rank_correlation(a, b, valid).item() == pytest.approx(1.0)
    assert rank_correlation(a, -b, valid).item() == pytest.approx(-1.0)


def test_identical_by_construction_on_a_gap_head_not_on_a_flatten_head():
    x = noise(4, 3, 16, 16)
    with Explainer(gap_net(), "3") as explainer:
        result = explainer(x, top_k=2)
        assert result.identical_by_construction.all()
        torch.testing.assert_close(result.maps["hirescam"], result.maps["gradcam"])
        traced = {info.name: info for info in trace_layers(explainer.model, x[:1])}
        assert explainer.identical_layers(x[:1], [traced[name] for name in "0123"]) == {
            "0": False,
            "1": False,
            "2": False,
            "3": True,
        }
        assert explainer.differing_layer(x) == "2"
    with Explainer(tiny_net(), "3") as explainer:
        assert not explainer(x, top_k=2).identical_by_construction.any()
    grads = torch.ones(1, 1, 2, 3 * 3)  # (B, T, K, N)
    assert constant_over_grid(grads).item()
    grads[0, 0, 1, 8] += 1e-3
    assert not constant_over_grid(grads).item()


def test_explain_records_identical_and_says_so_once(tmp_path, capsys):
    for i in range(6):
        rgb(16, 16, seed=i).save(tmp_path / f"{i}.png")
    args = ["explain", tmp_path, "-o", tmp_path / "out", "-c", config(tmp_path, "gap_net"), "--top-k", "2"]
    code, _, err = run(args, capsys)
    assert code == 0, err
    assert err.count("identical by construction") == 1
    assert "they differ at '2' (--target-layer 2)" in err
    summary = json.loads((tmp_path / "out" / "0.png" / "summary.json").read_text())
    assert [t["identical_by_construction"] for t in summary["targets"]] == [True, True]
    assert json.loads((tmp_path / "out" / "run.json").read_text())["identical_by_construction"] is True
    code, _, err = run(["explain", tmp_path, "-o", tmp_path / "flat", "-c", config(tmp_path)], capsys)
    assert code == 0 and "by construction" not in err
    assert json.loads((tmp_path / "flat" / "run.json").read_text())["identical_by_construction"] is False


def test_layers_marks_the_identical_layers(tmp_path, capsys):
    code, out, err = run(["layers", "-c", config(tmp_path, "gap_net")], capsys)
    assert code == 0, err
    lines = {line.split()[0]: line for line in out.splitlines()[2:] if line and line[0].isdigit()}
    assert "identical" in lines["3"] and "<- auto" in lines["3"]
    assert "differ" in lines["2"]


def test_eval_without_masks_on_the_sample_images(tmp_path, capsys):
    code, out, err = run(["eval", SAMPLES, "-o", tmp_path / "out"], capsys)
    assert code == 0, err

    def strict(name):
        raise AssertionError(f"eval.json holds {name}, which strict JSON parsers refuse")

    report = json.loads((tmp_path / "out" / "eval.json").read_text(), parse_constant=strict)
    assert {"images", "model", "target_layer", "methods", "metrics", "per_class", "problems"} <= set(report)
    assert "curves" not in report and report["masks"] is False
    assert report["images"] == 20 and report["pairs"] >= 20
    assert set(report["metrics"]) == {"rank_correlation", "unused_mass", "missed_evidence"}
    assert report["occlusion"] == {
        "grid": [8, 8],
        "positions": 64,
        "sampled": None,
        "batched": True,
        "unused_fraction": 0.01,
        "top_fraction": 0.2,
    }
    hires = report["methods"]["hirescam"]
    assert hires["rank_correlation"]["mean"] > 0.999  # the demo's head is affine: HiResCAM is Delta
    assert hires["rank_correlation"]["n"] == report["pairs"]
    assert report["methods"]["gradcam"]["rank_correlation"]["mean"] < hires["rank_correlation"]["mean"]
    assert report["identical_by_construction"] is False
    assert "Faithfulness to the model" in out and "| hirescam " in out and "pointing game" not in out


def test_eval_samples_positions_when_asked(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("sample_00.png", "sample_01.png"):
        (images / name).write_bytes((SAMPLES / name).read_bytes())
    code, _, err = run(["eval", images, "-o", tmp_path / "out", "--positions", "8"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["occlusion"]["sampled"] == 8


def test_planted_conv_model_gradcam_puts_mass_where_the_model_does_not_look():
    """Trained-like features, final weights zero outside a known block: HiResCAM follows Delta
    exactly there; Grad-CAM puts positive mass on positions whose removal changes nothing."""
    with seeded():
        features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=4, padding=1)
        )
        head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(6 * 8 * 8, 2))
    used = torch.zeros(8, 8, dtype=torch.bool)
    used[2:5, 3:6] = True
    with torch.no_grad():
        head[2].weight.view(2, 6, 8, 8)[:, :, ~used] = 0
    model = nn.Sequential(features, head)
    x = noise(8, 3, 32, 32, seed=1)
    with Explainer(model, "0") as explainer:
        result = explainer(x, classes=0)
        delta = explainer.occlusion(x, result.classes)
    assert (delta[:, 0][:, ~used] == 0).all()  # what the model ignores, occlusion finds unused
    hires = fidelity(result.maps["hirescam"][:, 0], delta[:, 0])
    grad = fidelity(result.maps["gradcam"][:, 0], delta[:, 0])
    assert (hires["unused_mass"] <= grad["unused_mass"]).all()
    assert grad["unused_mass"].mean() > 0.3
    assert (grad["rank_correlation"] < hires["rank_correlation"]).all()


def test_sparse_demo_model_reads_half_the_grid_and_gradcam_puts_mass_on_the_rest(tmp_path, capsys):
    from hirescam_cli.demo.sparse import load_sparse_model, read_positions

    weights = load_sparse_model().head[1].weight.view(5, 64, 8, 8)
    assert (weights[:, :, ~read_positions()] == 0).all()
    images = tmp_path / "images"
    images.mkdir()
    for name in ("sample_00.png", "sample_01.png", "sample_02.png"):
        (images / name).write_bytes((SAMPLES / name).read_bytes())
    config = Path(__file__).parent.parent / "configs" / "demo_sparse.toml"
    code, _, err = run(["eval", images, "-c", config, "-o", tmp_path / "out"], capsys)
    assert code == 0, err
    methods = json.loads((tmp_path / "out" / "eval.json").read_text())["methods"]
    assert methods["hirescam"]["unused_mass"]["mean"] < 0.01
    assert methods["gradcam"]["unused_mass"]["mean"] > 0.3


def zero_token(out, p):  # tokens: a class token, then the 4x4 patch grid, row-major
    out[:, 1 + p] = 0
    return out


def zero_channels_last(out, p):  # (B, h, w, K)
    out.view(out.shape[0], -1, out.shape[-1])[:, p] = 0
    return out


@pytest.mark.parametrize(
    ("factory", "layer", "zero_at", "batched"),
    [
        (tiny_vit, "encoder.layers.encoder_layer_0", zero_token, True),
        (tiny_vit, "encoder.layers.encoder_layer_1.ln_1", zero_token, False),  # its block adds its input
        (tiny_swin, "features.1", zero_channels_last, True),
    ],
)
def test_occlusion_reads_tokens_and_channels_last_through_the_layout(factory, layer, zero_at, batched):
    model = factory()
    x = noise(2, 3, 32, 32, seed=1)
    with Explainer(model, layer) as explainer:
        delta = explainer.occlusion(x, [0, 2])
        grid = explainer.layout(x).grid
        assert delta.shape == (2, 2, *grid) and explainer.occlusion_batched is batched
        module = dict(model.named_modules())[layer]
        with torch.no_grad():
            plain = model(x)[:, [0, 2]]
            expected = torch.empty(2, 2, grid[0] * grid[1])
            for p in range(grid[0] * grid[1]):
                handle = module.register_forward_hook(lambda _m, _i, out, p=p: zero_at(out.clone(), p))
                try:
                    expected[:, :, p] = plain - model(x)[:, [0, 2]]
                finally:
                    handle.remove()
    torch.testing.assert_close(delta.flatten(2), expected, atol=1e-5, rtol=1e-4)
