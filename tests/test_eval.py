"""`hirescam eval` on a tiny generated set, and the planted-model claim measured by its metrics."""

import json

import torch
from determinism import noise, seeded
from PIL import Image
from test_cli import run
from torch import nn

from hirescam_cli import Explainer
from hirescam_cli.demo.samples import write_samples
from hirescam_cli.metrics import localisation

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
    first = sorted(labels)[0]
    mask = next((tmp_path / "masks" / first.removesuffix(".png")).glob("*.png"))
    Image.new("L", (7, 7)).save(mask)  # a mis-sized mask is reported, not fatal
    (tmp_path / "labels.txt").write_text("circle\nsquare\ntriangle\nstar\ncross\n")
    config = tmp_path / "c.toml"
    config.write_text(CONFIG.format(labels=tmp_path / "labels.txt"))
    args = ["eval", tmp_path / "images", "--masks", tmp_path / "masks", "-c", config, "-o", tmp_path / "out"]
    code, out, err = run(args, capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    pairs = sum(len(v) for v in labels.values()) - 1
    assert set(report["methods"]) == {
        "hirescam",
        "gradcam",
        "gradcam++",
        "xgradcam",
        "layercam",
        "gradcam-elementwise",
    }
    localisation = {"energy", "pointing", "iou", "deletion_auc", "insertion_auc"}
    fidelity = {"rank_correlation", "unused_mass", "missed_evidence"}
    assert set(report["metrics"]) == localisation | fidelity
    for metrics in report["methods"].values():
        assert set(metrics) == localisation | fidelity
        assert all(m["n"] == pairs for name, m in metrics.items() if name != "missed_evidence")
        assert all(-1 <= m["mean"] <= 1 for m in metrics.values())
    assert set(report["curves"]) == set(report["methods"])
    assert all(len(c["deletion"]) == len(c["insertion"]) == 17 for c in report["curves"].values())
    assert set(report["per_class"]) <= {"circle", "square", "triangle", "star", "cross"}
    assert any("mask is 7x7" in p for p in report["problems"])
    assert "mask is 7x7" in err
    assert "| hirescam " in out and "| gradcam " in out


def test_planted_model_hirescam_energy_is_all_inside_the_used_positions():
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
    energy_hires = localisation(hires, masks)["energy"][has_mass]
    energy_grad = localisation(grad, masks)["energy"][has_mass]
    assert has_mass.sum() > 8
    torch.testing.assert_close(energy_hires, torch.ones_like(energy_hires))
    assert (energy_grad < 0.99).all()
