"""`hirescam eval` on a tiny generated set, and the planted-model claim measured by its metrics."""

import json

import numpy as np
import torch
from determinism import noise, seeded
from PIL import Image
from test_cli import run
from torch import nn

from hirescam_cli import Explainer
from hirescam_cli.demo.samples import write_samples
from hirescam_cli.evaluation import _padded, _spans
from hirescam_cli.metrics import localisation
from hirescam_cli.modalities.images import Preprocess

CONFIG = """
[model]
factory = "hirescam_cli.demo.net:load_demo_model"
labels = "{labels}"
multilabel = true
[preprocess]
resize = [128, 128]
mean = [0.5, 0.5, 0.5]
std = [0.5, 0.5, 0.5]
[explain]
workers = 0
"""


def test_eval_on_a_tiny_set_reports_every_method_and_bad_masks(tmp_path, capsys):
    labels = write_samples(tmp_path / "images", tmp_path / "masks", count=3)
    first, second = sorted(labels)[:2]
    mask = next((tmp_path / "masks" / first.removesuffix(".png")).glob("*.png"))
    Image.new("L", (7, 7)).save(mask)  # a mis-sized mask is reported, not fatal
    with Image.open(tmp_path / "images" / second) as image:
        Image.new("L", image.size).save(tmp_path / "masks" / second.removesuffix(".png") / "star.png")
    (tmp_path / "labels.txt").write_text("circle\nsquare\ntriangle\nstar\ncross\n")
    config = tmp_path / "c.toml"
    config.write_text(CONFIG.format(labels=tmp_path / "labels.txt"))
    args = ["eval", tmp_path / "images", "--masks", tmp_path / "masks", "-c", config, "-o", tmp_path / "out"]
    code, out, err = run(args, capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    pairs = sum(len(v) for v in labels.values()) - 1 - ("star" in labels[second])
    assert report["pairs"] == pairs
    assert report["empty_masks"] == 1  # an empty mask: its pair is dropped and counted
    assert set(report["methods"]) == {
        "hirescam",
        "gradcam",
        "gradcam++",
        "xgradcam",
        "layercam",
        "gradcam-elementwise",
    }
    localisation = {"pointing_game", "relevance_mass_accuracy", "relevance_rank_accuracy", "roc_auc"}
    deletion = {"deletion_auc", "insertion_auc"}
    fidelity = {"rank_correlation", "unused_mass", "missed_evidence"}
    assert set(report["metrics"]) == localisation | deletion | fidelity
    spaces = {name: info["space"] for name, info in report["metrics"].items()}
    assert spaces == {
        **dict.fromkeys(localisation, "original"),
        **dict.fromkeys(deletion, "input"),
        **dict.fromkeys(fidelity, "layer grid"),
    }
    assert "Zhang et al. 2018" in report["metrics"]["pointing_game"]["reference"]
    assert "Arras et al. 2022" in report["metrics"]["relevance_rank_accuracy"]["reference"]
    assert all(
        info["reference"] and info["better"] in ("higher", "lower") for info in report["metrics"].values()
    )
    for method, metrics in report["methods"].items():
        assert set(metrics) == localisation | deletion | fidelity
        no_mass = report["no_positive_mass"][method]
        assert metrics["relevance_mass_accuracy"]["n"] == pairs - no_mass
        assert all(
            m["n"] == pairs
            for name, m in metrics.items()
            if name in localisation - {"relevance_mass_accuracy"}
        )
        assert all(-1 <= m["mean"] <= 1 for m in metrics.values())
    assert set(report["curves"]) == set(report["methods"])
    assert all(len(c["deletion"]) == len(c["insertion"]) == 17 for c in report["curves"].values())
    assert set(report["per_class"]) <= {"circle", "square", "triangle", "star", "cross"}
    assert any("mask is 7x7" in p for p in report["problems"])
    assert not any("star.png" in p for p in report["problems"])  # an empty mask is no problem
    assert "mask is 7x7" in err
    assert "| hirescam " in out and "| gradcam " in out and "on the original inputs" in out


def test_localisation_is_scored_on_the_original_picture(tmp_path, capsys):
    """A mask wholly outside the model input's crop cannot be found, whatever the map: no hit and no
    mass inside it; scored on the model input it would not even exist."""
    write_samples(tmp_path / "images", tmp_path / "masks", count=1)
    image = next((tmp_path / "images").glob("*.png"))
    with Image.open(image) as picture:
        width, height = picture.size
    folder = tmp_path / "masks" / image.stem
    for old in folder.glob("*.png"):
        old.unlink()
    strip = np.zeros((height, width), np.uint8)
    strip[:, :3] = 255  # the leftmost 3 columns, which a centre crop to 100 x 100 cuts off
    Image.fromarray(strip).save(folder / "circle.png")
    (tmp_path / "labels.txt").write_text("circle\nsquare\ntriangle\nstar\ncross\n")
    config = tmp_path / "c.toml"
    text = CONFIG.format(labels=tmp_path / "labels.txt").replace(
        "resize = [128, 128]", "resize = 146\ncrop = 128"
    )
    config.write_text(text)
    with Image.open(image) as picture:
        box = Preprocess(146, 128, (0.5,) * 3, (0.5,) * 3)(
            torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)
        )[1]
    assert box[0] > 3  # the crop cuts the strip off
    code, _, err = run(
        ["eval", tmp_path / "images", "--masks", tmp_path / "masks", "-c", config, "-o", tmp_path / "out"],
        capsys,
    )
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["pairs"] == 1
    for metrics in report["methods"].values():
        assert metrics["pointing_game"]["mean"] == 0.0
        assert metrics["relevance_rank_accuracy"]["mean"] == 0.0
        assert metrics["relevance_mass_accuracy"]["mean"] in (0.0, None)  # None: no positive mass at all
        assert metrics["roc_auc"]["mean"] < 0.5


def test_planted_model_hirescam_mass_is_all_inside_the_used_positions():
    """Final linear weights are zero outside a known set of positions: HiResCAM puts all its
    positive mass there, exactly; Grad-CAM spreads some outside."""
    with seeded():
        features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=4, padding=1)
        )
        head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 8 * 8, 2))
    used = torch.zeros(8, 8, dtype=torch.bool)
    used[2:5, 3:6] = True
    with torch.no_grad():
        head[1].weight.view(2, 6, 8, 8)[:, :, ~used] = 0
    model = nn.Sequential(features, head)
    x = noise(16, 3, 32, 32, seed=1)
    with Explainer(model, "0") as explainer:
        result = explainer(x, classes=0)
    masks = used.expand(16, 8, 8)  # at the map's resolution, so no interpolation blurs the edge
    hires = result.maps["hirescam"][:, 0]
    grad = result.maps["gradcam"][:, 0]
    assert (hires.clamp_min(0)[:, ~used] == 0).all()
    has_mass = hires.clamp_min(0).sum((-2, -1)) > 0
    mass_hires = localisation(hires, masks)["relevance_mass_accuracy"][has_mass]
    mass_grad = localisation(grad, masks)["relevance_mass_accuracy"][has_mass]
    assert has_mass.sum() > 8
    torch.testing.assert_close(mass_hires, torch.ones_like(mass_hires))
    assert (mass_grad < 0.99).all()


def test_pairs_are_scored_in_spans_of_bounded_padded_size():
    """Consecutive spans cover every pair once; padded to its largest shape, each stays within the
    budget unless it is a single pair."""
    shapes = [(10, 10), (5, 30), (10, 10), (40, 40), (3, 3), (3, 3), (3, 3)]
    spans = _spans(shapes, 200)
    assert [list(s) for s in spans] == [[0], [1], [2], [3], [4, 5, 6]]  # (10, 30) x 2 = 600 > 200
    assert [p for s in _spans(shapes, 10**6) for p in s] == list(range(7))
    masks = [np.ones((2, 3), bool), np.ones((4, 1), bool)]
    padded = _padded(masks)
    assert padded.shape == (2, 4, 3) and padded.sum().item() == 10 and padded[1, :, 0].all()
