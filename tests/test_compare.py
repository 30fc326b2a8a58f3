"""`hirescam compare`: the summaries' grid maps and geometry, the common footing, agreement checked against
the overlays' own registration, the gates and their exit code, unmatched inputs, bad input, the OUT lock,
and the Markdown summary. (tests/test_compare_browser.py loads the page in Chromium.)"""

import base64
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from compare_runs import MALICIOUS, explain, shared_pair, summaries, write_images
from test_cli import run
from test_startup import PROBE

from hirescam_cli import render
from hirescam_cli.compare import agreement, sides
from hirescam_cli.compare.agreement import pearson, top_region_iou
from hirescam_cli.compare.markdown import code
from hirescam_cli.modalities import geometry
from hirescam_cli.modalities.image_overlays import covered, register
from hirescam_cli.summary import GRID_POSITIONS, SCHEMA

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    return shared_pair(tmp_path_factory)


def compare(capsys, *args: object) -> tuple[int, str, str]:
    return run(["compare", *args], capsys)


def grid_values(entry: dict) -> np.ndarray:
    grid = entry["grid"]
    values = np.frombuffer(base64.b64decode(grid["float16"]), "<f2").astype(np.float64)
    return values.reshape(grid["shape"]) * grid["scale"]


def on_pixels(summary: dict, raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """A raw map as its overlay shows it: normalised on its grid, registered onto the original's pixels
    through the crop box (the renderer's own code); and which pixels the box covers."""
    maps = render.normalize(torch.as_tensor(raw, dtype=torch.float32)[None, None])
    box, rows = torch.tensor([summary["box"]]), range(summary["height"])
    return register(maps, box, rows, summary["width"])[0, 0], covered(box, rows, summary["width"])[0]


def pixel_pearson(bs: dict, b_raw: np.ndarray, ns: dict, n_raw: np.ndarray) -> float:
    """Pearson r of two overlays' values over the pixels both crop boxes cover, computed independently."""
    (a, a_in), (b, b_in) = on_pixels(bs, b_raw), on_pixels(ns, n_raw)
    both = a_in & b_in
    x, y = a[both].double().numpy(), b[both].double().numpy()
    x, y = x - x.mean(), y - y.mean()
    if not (x.any() and y.any()):  # an empty picture (no positive part): the documented convention
        return float(not x.any() and not y.any())
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def integral_box(summary: dict) -> bool:
    """Whether the crop box lies on whole pixels (the footing then samples exactly the pixel centres)."""
    return all(float(v).is_integer() for v in summary["box"])


# ---- what summaries keep


def test_summaries_keep_small_maps_and_their_geometry(pair):
    """The grid map decodes to the --save-raw array within float16's precision; the box is the crop."""
    assert SCHEMA == sides.SUMMARY_SCHEMA
    assert json.loads((pair["base"] / "run.json").read_text())["schema"] == sides.RUN_SCHEMA
    found = summaries(pair["base"])
    for summary in found.values():
        width, height = summary["width"], summary["height"]
        short = min(width, height)
        # resize the shorter side to 16, centre-crop 16 x 16: the box is the centre square of the short side
        assert summary["box"][2] - summary["box"][0] == pytest.approx(short, rel=0.07)
        assert summary["box"][3] - summary["box"][1] == pytest.approx(short, rel=0.07)
        for target in summary["targets"]:
            for entry in target["maps"].values():
                raw = np.load(pair["base"] / entry["raw"])
                assert entry["grid"]["shape"] == list(raw.shape) == [8, 8]
                assert entry["grid"]["scale"] == pytest.approx(np.abs(raw).max(), rel=1e-6)
                np.testing.assert_allclose(grid_values(entry), raw, rtol=0, atol=2**-11 * np.abs(raw).max())
    assert found["img_00.png"]["box"] == [0.0, 0.0, 16.0, 16.0]
    assert found["img_02.png"]["box"] == [0.0, 2.0, 16.0, 18.0]


def test_large_maps_are_not_kept_and_compare_reads_the_raw_arrays_instead(tmp_path, capsys):
    images = write_images(tmp_path / "images", 2, scale=3)
    plain = explain(images, tmp_path / "plain", "grid33_net", 66)
    (summary,) = list(summaries(plain).values())[:1]
    entry = summary["targets"][0]["maps"]["hirescam"]
    assert agreement.GRID_POSITIONS == GRID_POSITIONS < 33 * 33 and "grid" not in entry
    code_, out, err = compare(capsys, plain, plain, "--min-agreement", "0.5")
    assert code_ == 6
    assert "hirescam: gate failed: --min-agreement 0.5: no input has HiResCAM maps on both sides" in err
    assert "its grid of 1,089 positions is too large for a summary: explain with --save-raw" in out
    raw = explain(images, tmp_path / "raw", "grid33_net", 66, "--save-raw")
    code_, out, err = compare(capsys, raw, raw, "--min-agreement", "1", "-o", tmp_path / "cmp")
    assert code_ == 0, err
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["inputs"]
    assert [row["agreement"] for row in rows] == [1.0, 1.0]


# ---- the footing, on its own


def _summary(width: int, height: int, box: list[float]) -> dict:
    return {"width": width, "height": height, "box": box}


def test_the_footing_reads_a_map_exactly_as_its_overlay_is_drawn():
    """Every pixel of a picture smaller than the footing's bound: the samples are the overlay's values."""
    rng = np.random.default_rng(3)
    raw = rng.normal(size=(8, 8))
    summary = _summary(100, 70, [10.0, -5.0, 90.0, 75.0])  # a crop that pads above and below
    where = geometry("images").footing(summary, summary)
    values, inside = on_pixels(summary, raw)
    expected = values[inside].double().numpy()  # rows 0..69, columns 10..89: row-major, as the samples
    picture = render.normalize(torch.as_tensor(raw)[None, None])[0, 0].double().numpy()
    np.testing.assert_allclose(where.sample(0, picture), expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(where.sample(0, picture), where.sample(1, picture))


def test_maps_of_different_grids_and_crops_meet_on_the_original():
    """One smooth scene seen through two crops at 14x14 and 7x7: registered, the maps agree closely; read
    cell by cell (without the geometry) they do not."""
    scene = lambda x, y: np.exp(-(((x - 60) / 25) ** 2) - ((y - 40) / 20) ** 2)  # noqa: E731
    base = _summary(120, 80, [0.0, 0.0, 80.0, 80.0])
    new = _summary(120, 80, [30.0, 0.0, 110.0, 80.0])

    def seen(summary: dict, cells: int) -> np.ndarray:
        x0, y0, x1, y1 = summary["box"]
        xs = x0 + (np.arange(cells) + 0.5) * (x1 - x0) / cells
        ys = y0 + (np.arange(cells) + 0.5) * (y1 - y0) / cells
        return scene(xs[None, :], ys[:, None])

    a, b = seen(base, 14), seen(new, 7)
    where = geometry("images").footing(base, new)
    on_footing = pearson(where.sample(0, a), where.sample(1, b))
    cell_by_cell = pearson(a[::2, ::2].ravel(), b.ravel())
    assert on_footing > 0.99 > 0.5 > cell_by_cell


def test_crops_that_do_not_meet_have_no_footing_and_old_summaries_say_why():
    images = geometry("images")
    assert (
        images.footing(_summary(100, 50, [0.0, 0.0, 50.0, 50.0]), _summary(100, 50, [50.0, 0, 100, 50]))
        is None
    )
    with pytest.raises(ValueError, match="no crop box"):
        images.footing({"width": 10, "height": 10}, _summary(10, 10, [0, 0, 10, 10]))


def test_agreement_conventions():
    rng = np.random.default_rng(4)
    a = rng.normal(size=50)
    assert pearson(a, a) == pytest.approx(1.0, abs=1e-12) and pearson(a, -a) == pytest.approx(-1.0, abs=1e-12)
    assert pearson(np.zeros(5), np.zeros(5)) == 1.0  # two empty pictures agree
    assert pearson(np.zeros(5), a[:5]) == 0.0
    assert top_region_iou(a, a) == 1.0
    assert top_region_iou(np.arange(10.0), -np.arange(10.0)) == 0.0
    assert top_region_iou(np.arange(10.0), np.r_[0.0, 0, 0, 0, 0, 0, 0, 0, 1, 2]) == 1.0  # the top 2 of 10


# ---- whole comparisons


def test_a_run_compared_with_itself_agrees_exactly(pair, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(pair["base"], copy)
    gates = ["--min-agreement", "1", "--min-agreement-each", "1", "--max-changed", "0"]
    for other in (pair["base"], copy):  # the same folder (one lock), and a copy elsewhere
        code_, out, err = compare(capsys, pair["base"], other, "-o", tmp_path / "cmp", *gates)
        assert code_ == 0, err
        document = json.loads((tmp_path / "cmp" / "compare.json").read_text())
        assert document["passed"] and [g["passed"] for g in document["gates"]] == [True] * 3
        totals = document["aggregates"]
        assert totals["inputs"]["compared"] == len(summaries(pair["base"])) == 14
        assert totals["top1_changed"]["count"] == totals["top5_changed"]["count"] == 0
        for row in document["inputs"]:
            assert row["agreement"] == 1.0 and row["problems"] == [] and row["classes"]
            for c in row["classes"]:
                assert c["probability_change"] == 0.0
                for cell in c["maps"].values():
                    assert (cell["pearson"], cell["top20_iou"], cell["peak_distance"]) == (1.0, 1.0, 0.0)
        assert "## HiResCAM compare: **all gates passed**" in out
        assert (tmp_path / "cmp" / "compare.html").is_file()


def test_a_perturbed_head_is_found_and_gated(pair, capsys):
    base, new = summaries(pair["base"]), summaries(pair["new"])
    changed = sorted(
        k for k in base if base[k]["predictions"][0]["class"] != new[k]["predictions"][0]["class"]
    )
    assert 0 < len(changed) < len(base)
    document = json.loads((pair["dir"] / "compare.json").read_text())
    rows = {row["key"]: row for row in document["inputs"]}
    assert sorted(k for k, row in rows.items() if row["top1_changed"]) == changed
    checked = 0
    for key, row in rows.items():
        for c in row["classes"]:
            bt = next(t for t in base[key]["targets"] if t["class"] == c["class"])
            nt = next(t for t in new[key]["targets"] if t["class"] == c["class"])
            assert c["probability_change"] == pytest.approx(nt["probability"] - bt["probability"], abs=1e-6)
            assert (c["base"]["completeness_gap"], c["new"]["completeness_gap"]) == (
                bt["completeness_gap"],
                nt["completeness_gap"],
            )
            assert c["base"]["guarantee"] is c["new"]["guarantee"] is True
            for method, cell in c["maps"].items():
                b_peak, n_peak = bt["maps"][method]["peak"], nt["maps"][method]["peak"]
                assert cell["peak_distance"] == pytest.approx(math.dist(b_peak, n_peak), rel=1e-6)
                if integral_box(base[key]):
                    b_raw = np.load(pair["base"] / bt["maps"][method]["raw"])
                    n_raw = np.load(pair["new"] / nt["maps"][method]["raw"])
                    expected = pixel_pearson(base[key], b_raw, new[key], n_raw)
                    assert cell["pearson"] == pytest.approx(expected, abs=2e-3)
                    checked += 1
    assert checked >= 10
    agreements = [row["agreement"] for row in rows.values() if row["agreement"] is not None]
    median, lowest = float(np.median(agreements)), min(agreements)
    assert lowest < median < 1.0
    high, middle = round((median + 1) / 2, 4), round((lowest + median) / 2, 4)
    gates = ["--max-changed", "0", "--min-agreement", str(high), "--min-agreement-each", str(middle)]
    code_, out, err = compare(capsys, pair["base"], pair["new"], *gates)
    assert code_ == 6
    n, total = len(changed), len(rows)
    worst = min((row for row in rows.values() if row["agreement"] is not None), key=lambda r: r["agreement"])
    below = sum(a < middle for a in agreements)
    assert [line for line in err.splitlines() if line.startswith("hirescam: gate failed: ")] == [
        f"hirescam: gate failed: --min-agreement {high:g}: the median HiResCAM r is {median:.4f} over "
        f"{len(agreements)} inputs",
        f"hirescam: gate failed: --max-changed 0: the top-1 class changed for {n} of {total} inputs "
        f"({n / total:.4f})",
        f"hirescam: gate failed: --min-agreement-each {middle:g}: {below} of {len(agreements)} inputs are "
        f"below it (lowest: {worst['key']}, r {lowest:.4f})",
    ]
    assert "**3 of 3 gates failed**" in out
    code_, _, err = compare(
        capsys, pair["base"], pair["new"], "--max-changed", str(math.ceil(n / total * 1e6) / 1e6)
    )
    assert code_ == 0, err


def test_models_with_different_grids_compare_on_the_original(tmp_path, capsys):
    images = write_images(tmp_path / "images", 6, scale=2)
    base = explain(images, tmp_path / "g14", "grid14_net", 28, "--save-raw", "--top-k", "3")
    new = explain(images, tmp_path / "g7", "grid7_net", 28, "--save-raw", "--top-k", "3")
    code_, out, err = compare(capsys, base, new, "-o", tmp_path / "cmp")
    assert code_ == 0, err
    document = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert (document["base"]["grid"], document["new"]["grid"]) == ([14, 14], [7, 7])
    assert "| grid | 14 \N{MULTIPLICATION SIGN} 14 | 7 \N{MULTIPLICATION SIGN} 7 |" in out
    b_all, n_all = summaries(base), summaries(new)
    checked = 0
    for row in document["inputs"]:
        bs, ns = b_all[row["key"]], n_all[row["key"]]
        for c in row["classes"]:
            bt = next(t for t in bs["targets"] if t["class"] == c["class"])
            nt = next(t for t in ns["targets"] if t["class"] == c["class"])
            for method, cell in c["maps"].items():
                assert -1 <= cell["pearson"] <= 1 and 0 <= cell["top20_iou"] <= 1
                if integral_box(bs):
                    b_raw, n_raw = (
                        np.load(out_ / t["maps"][method]["raw"]) for out_, t in ((base, bt), (new, nt))
                    )
                    assert b_raw.shape == (14, 14) and n_raw.shape == (7, 7)
                    assert cell["pearson"] == pytest.approx(pixel_pearson(bs, b_raw, ns, n_raw), abs=2e-3)
                    checked += 1
    assert checked >= 4


def test_inputs_on_one_side_other_bytes_and_failures_are_listed_not_compared(tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    write_images(one, 4)
    (one / "broken.png").write_bytes(b"not an image")
    two.mkdir()
    for name in ("img_02.png", "img_03.png"):
        shutil.copy(one / name, two / name)
    write_images(tmp_path / "other", 6, seed=9)
    shutil.copy(tmp_path / "other" / "img_05.png", two / "img_05.png")
    shutil.copy(tmp_path / "other" / "img_03.png", two / "img_03.png")  # same key, other bytes
    base = explain(one, tmp_path / "base", "tiny_net")
    new = explain(two, tmp_path / "new", "tiny_net")
    code_, out, err = compare(capsys, base, new, "-o", tmp_path / "cmp")
    assert code_ == 0, err
    document = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [row["key"] for row in document["inputs"]] == ["img_02.png"]
    listed = document["not_compared"]
    assert listed["only_base"] == sorted(["img_00.png", MALICIOUS])
    assert listed["only_new"] == ["img_05.png"]
    assert listed["bytes_differ"] == ["img_03.png"]
    assert [(f["side"], Path(f["input"]).name) for f in listed["failed"]] == [("BASE", "broken.png")]
    assert "(not compared: 2 only in BASE, 1 only in NEW, 1 with other bytes, 1 failed on a side)" in out


@pytest.mark.parametrize(
    "change, message",
    [
        ("methods", "BASE explains hirescam, gradcam and NEW hirescam: compare runs of the same methods"),
        ("run schema", "run.json has schema 'hirescam-cli/run/9', not 'hirescam-cli/run/1'"),
        ("summary schema", "summary.json has schema 'hirescam-cli/summary/9', not 'hirescam-cli/summary/1'"),
        ("no common input", "BASE and NEW have no input in common (same key and sha256)"),
        ("not a run", "holds no run"),
    ],
)
def test_runs_that_cannot_be_compared_get_one_line(pair, tmp_path, capsys, change, message):
    new = tmp_path / "new"
    if change == "methods":
        images = write_images(tmp_path / "images", 2)
        base = explain(images, tmp_path / "base", "tiny_net")
        new = explain(images, new, "tiny_net", 16, "--methods", "hirescam")
    else:
        base = pair["base"]
        shutil.copytree(pair["new"], new)
        if change == "run schema":
            run_json = json.loads((new / "run.json").read_text())
            (new / "run.json").write_text(json.dumps(run_json | {"schema": "hirescam-cli/run/9"}))
        elif change == "summary schema":
            path = new / "img_03.png" / "summary.json"
            path.write_text(json.dumps(json.loads(path.read_text()) | {"schema": "hirescam-cli/summary/9"}))
        elif change == "no common input":
            for path in new.glob("*/summary.json"):
                path.write_text(json.dumps(json.loads(path.read_text()) | {"sha256": "0" * 64}))
        else:
            shutil.rmtree(new)
            new.mkdir()
    code_, out, err = compare(capsys, base, new, "-o", tmp_path / "cmp")
    assert code_ == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "cmp").exists()


def test_usage_errors(pair, tmp_path, capsys):
    assert compare(capsys, pair["base"], tmp_path / "missing")[0] == 2
    code_, _, err = compare(capsys, pair["base"], pair["new"], "-o", pair["new"])
    assert code_ == 2 and "is BASE or NEW itself" in err
    code_, _, err = compare(capsys, pair["base"], pair["new"], "--max-changed", "1.5")
    assert code_ == 2 and "--max-changed" in err
    only_gradcam = tmp_path / "g"
    images = write_images(tmp_path / "images", 2)
    explain(images, only_gradcam, "tiny_net", 16, "--methods", "gradcam")
    code_, _, err = compare(capsys, only_gradcam, only_gradcam, "--min-agreement", "0.5")
    assert code_ == 2 and "--min-agreement gate HiResCAM's maps" in err
    code_, out, _ = compare(capsys, only_gradcam, only_gradcam)  # Grad-CAM's agreement, no gate
    assert code_ == 0 and "| Grad-CAM | 1.000 | 1.000 | 1.000 | 0.0 | 2 |" in out
    assert f"| {code(MALICIOUS)} | " in out and "<img" not in out.replace(code(MALICIOUS), "")


def test_a_version_change_is_noted_and_compared(pair, tmp_path, capsys):
    new = tmp_path / "new"
    shutil.copytree(pair["base"], new)
    run_json = json.loads((new / "run.json").read_text())
    (new / "run.json").write_text(json.dumps(run_json | {"version": "9.9.9"}))
    code_, out, err = compare(capsys, pair["base"], new)
    assert code_ == 0
    assert f"hirescam: note: BASE was written by hirescam-cli {run_json['version']} and NEW by 9.9.9" in err
    assert "Note: BASE was written by" in out


def test_the_summary_goes_to_the_step_summary_too_and_names_are_literal(pair, tmp_path, capsys, monkeypatch):
    summary = tmp_path / "step.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    code_, out, _ = compare(capsys, pair["base"], pair["new"])
    assert code_ == 0
    assert summary.read_text() == "earlier step\n" + out
    assert code("a|b`c") == "``a\\|b`c``" and code("`x") == "`` `x ``"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "no" / "such" / "folder"))
    code_, _, err = compare(capsys, pair["base"], pair["new"])
    assert code_ == 0 and "warning: cannot append the summary to $GITHUB_STEP_SUMMARY" in err


HOLD = (
    "import sys; from hirescam_cli.lock import OutLock; lock = OutLock(sys.argv[1]); lock.acquire(); "
    "print('locked', flush=True); sys.stdin.read()"
)


def test_a_locked_run_is_refused_or_waited_for_without_torch(pair, tmp_path):
    new = tmp_path / "new"
    shutil.copytree(pair["new"], new)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(new)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = [sys.executable, "-c", PROBE, "compare", pair["base"], new]
        refused = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 4 and "is locked by another run" in refused.stderr
        assert (
            "pass --wait to wait for it" in refused.stderr
            and refused.stdout.strip() == "torch imported: False"
        )
        waiting = subprocess.Popen(
            [*args, "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert "waiting for the run that holds" in waiting.stderr.readline()
        holder.stdin.close()
        out, err = waiting.communicate(timeout=120)
        assert waiting.returncode == 0, err
        assert "## HiResCAM compare" in out and out.strip().endswith("torch imported: False")
    finally:
        holder.kill()
        holder.wait()


def test_summaries_written_before_maps_were_kept_say_how_to_redo_them(pair, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(pair["base"], old, ignore=shutil.ignore_patterns("*.npy"))
    for path in old.glob("*/summary.json"):
        summary = json.loads(path.read_text())
        summary.pop("box")
        for target in summary["targets"]:
            for entry in target["maps"].values():
                del entry["grid"]
                entry["raw"] = None
        path.write_text(json.dumps(summary))
    code_, _, err = compare(capsys, old, pair["new"], "-o", tmp_path / "cmp")
    assert code_ == 0, err
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["inputs"]
    with_classes = [row for row in rows if row["classes"]]
    assert with_classes and all(row["agreement"] is None for row in rows)
    assert all("rerun `hirescam explain` with --overwrite" in row["problems"][0] for row in with_classes)
    assert all(
        cell["peak_distance"] is not None
        for row in with_classes
        for cell in row["classes"][0]["maps"].values()
    )
