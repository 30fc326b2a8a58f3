"""The shipped 3-D demo: phantoms with true lesion masks, the trained VolumeNet and its sparse head, the
sample scans, and `hirescam explain sample_volumes -c configs/demo3d.toml` from a fresh clone."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from test_cli import run

from hirescam_cli.demo.phantoms import CLASSES, draw, model_grid, render, world_points
from hirescam_cli.demo.volume_net import (
    SPARSE_WEIGHTS_PATH,
    WEIGHTS_PATH,
    load_sparse_volume_model,
    load_volume_model,
    read_cells,
)
from hirescam_cli.demo.volume_samples import write_samples
from hirescam_cli.demo.volume_train import measure

ROOT = Path(__file__).resolve().parents[1]
TEST_SEED = 4242  # disjoint from training (0, 1), the samples (2030) and the held-out stream


def test_phantoms_are_reproducible_and_lesions_lie_in_their_organs():
    shape, affine = model_grid(32, 5.0)
    points = world_points(shape, affine)
    present = np.zeros(len(CLASSES))
    for index in range(12):
        phantom = draw(TEST_SEED, index)
        hu, masks = render(phantom, shape, affine)
        again, again_masks = render(draw(TEST_SEED, index), shape, affine)
        assert np.array_equal(hu, again) and masks.keys() == again_masks.keys()
        assert set(masks) == {c for c, on in zip(CLASSES, phantom.labels, strict=True) if on}
        present += phantom.labels
        for name, mask in masks.items():
            assert mask.any()
            organs = {
                "lung_nodule": phantom.lungs,
                "liver_lesion": (phantom.liver,),
                "kidney_cyst": phantom.kidneys,
            }.get(name)
            if organs is not None:  # the lesion's centre lies in its organ
                centre = np.array(phantom.lesions[name].centre)
                assert any(organ.inside(centre) for organ in organs)
        assert hu.min() < -900 and hu.max() > 600  # air and bone
        assert points.shape == (*shape, 3)
    assert (present > 0).all()  # every kind occurs


def test_the_shipped_weights_are_small_and_the_sparse_head_reads_half_the_grid():
    assert WEIGHTS_PATH.stat().st_size < 1_000_000 and SPARSE_WEIGHTS_PATH.stat().st_size < 1_000_000
    dense, sparse = load_volume_model(), load_sparse_volume_model()
    weight = sparse.head[1].weight.view(len(CLASSES), -1, 8, 8, 8)
    assert (weight[:, :, ~read_cells()] == 0).all() and (weight[:, :, read_cells()] != 0).any()
    for name, tensor in dense.features.state_dict().items():
        assert torch.equal(tensor, sparse.features.state_dict()[name])


def test_the_sample_scans_are_what_the_writer_makes(tmp_path):
    labels = write_samples(tmp_path / "volumes", tmp_path / "masks")
    shipped = json.loads((ROOT / "sample_volume_masks" / "labels.json").read_text())
    assert labels == shipped
    for name in labels:
        ours, theirs = nib.load(tmp_path / "volumes" / name), nib.load(ROOT / "sample_volumes" / name)
        assert np.array_equal(ours.affine, theirs.affine)
        assert np.array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))
        for label in labels[name]:
            stem = name.removesuffix(".nii.gz")
            mask = np.asarray(nib.load(ROOT / "sample_volume_masks" / stem / f"{label}.nii.gz").dataobj)
            assert mask.shape == theirs.shape and mask.any()


def test_held_out_quality_of_the_shipped_model():
    quality = measure(load_volume_model(), count=60)
    mean_ap = np.nanmean([q["ap"] for q in quality.values()])
    # the shipped weights: lung nodules AP 1.0, the other kinds near 0.5 (docs/volumes.md); a guard
    # against a worse model, not the goal
    assert mean_ap > 0.55 and quality["lung_nodule"]["ap"] > 0.9, quality


def test_explain_the_samples_with_the_shipped_configs(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(
        ["explain", ROOT / "sample_volumes", "-c", ROOT / "configs" / "demo3d.toml", "-o", out, "-q"], capsys
    )
    assert code == 0, err
    names = sorted(p.name for p in (ROOT / "sample_volumes").iterdir())
    explained = 0
    for name in names:
        summary = json.loads((out / name / "summary.json").read_text())
        scan = nib.load(ROOT / "sample_volumes" / name)
        assert summary["orientation"] == "LPS" and summary["shape"] == list(scan.shape)
        for target in summary["targets"]:
            explained += 1
            nifti = nib.load(out / target["maps"]["hirescam"]["nifti"])
            assert nifti.shape == scan.shape and np.array_equal(nifti.affine, scan.affine)
            assert target["guarantee"] and abs(target["completeness_gap"]) < 1e-3
    assert explained >= len(names)
    sparse = tmp_path / "sparse"
    flags = ["-c", ROOT / "configs" / "demo3d_sparse.toml", "-o", sparse, "--save-raw", "-q"]
    assert run(["explain", ROOT / "sample_volumes", *flags], capsys)[0] == 0
    unread, spread = ~read_cells().numpy(), 0.0
    for name in names:
        for target in json.loads((sparse / name / "summary.json").read_text())["targets"]:
            hires = np.load(sparse / target["maps"]["hirescam"]["raw"])
            grad = np.load(sparse / target["maps"]["gradcam"]["raw"])
            assert (hires[unread] == 0).all()  # HiResCAM: no mass where the head provably does not read
            spread = max(spread, float(np.abs(grad[unread]).sum() / np.abs(grad).sum()))
    assert spread > 0.1  # Grad-CAM puts mass there
