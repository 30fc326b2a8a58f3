"""The shipped demo: deterministic synthetic data with true masks, the trained model, the samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from hirescam_cli.demo.net import INPUT_SIZE, LABELS_PATH, WEIGHTS_PATH, DemoNet, load_demo_model, preprocess
from hirescam_cli.demo.quality import average_precision, f1_score, measure
from hirescam_cli.demo.samples import write_samples
from hirescam_cli.demo.synthetic import CLASSES, MAX_SIDE, MIN_SIDE, ShapesDataset, generate, to_tensor
from hirescam_cli.demo.train import save_atomic, train

ROOT = Path(__file__).resolve().parents[1]
TEST_SEED = 31337  # disjoint from training (0) and the quality report's stream


def pixels(image: Image.Image) -> np.ndarray:
    """HxWx3 uint8 array of an image."""
    return np.asarray(image)


def test_generation_is_reproducible_per_index() -> None:
    """The same (seed, index) gives identical pixels and masks; another index or seed differs."""
    first, again = generate(TEST_SEED, 3), generate(TEST_SEED, 3)
    assert np.array_equal(pixels(first.image), pixels(again.image))
    assert first.masks.keys() == again.masks.keys()
    assert all(np.array_equal(first.masks[k], again.masks[k]) for k in first.masks)
    assert torch.equal(first.labels, again.labels)
    for other in (generate(TEST_SEED, 4), generate(TEST_SEED + 1, 3)):
        assert first.image.size != other.image.size or not np.array_equal(
            pixels(first.image), pixels(other.image)
        )


@pytest.fixture(scope="module")
def samples() -> list:
    """A few dozen generated samples shared by the data tests."""
    return [generate(TEST_SEED, i) for i in range(40)]


def test_sizes_labels_and_masks_agree(samples: list) -> None:
    """Sizes vary within bounds, 1-3 classes per image, and a non-empty mask for exactly those."""
    sizes = set()
    for sample in samples:
        w, h = sample.image.size
        sizes.add((w, h))
        assert sample.image.mode == "RGB" and MIN_SIDE <= w <= MAX_SIDE and MIN_SIDE <= h <= MAX_SIDE
        assert sample.labels.shape == (len(CLASSES),) and 1 <= sample.labels.sum() <= 3
        assert sample.names == [c for c, on in zip(CLASSES, sample.labels.tolist(), strict=True) if on]
        assert set(sample.masks) == set(sample.names)
        for mask in sample.masks.values():
            assert mask.dtype == bool and mask.shape == (h, w)
            assert 0.005 < mask.mean() < 0.5
        total = sum(m.astype(int) for m in sample.masks.values())
        assert total.max() == 1, "objects never overlap, so each pixel has at most one class"
    assert len(sizes) > 30 and any(w != h for w, h in sizes)


def test_masks_cover_the_drawn_objects(samples: list) -> None:
    """Inside a mask the colour is the object's: uniform-ish and unlike the pixels just around it."""
    contrasts, spreads = [], []
    for sample in samples:
        image = pixels(sample.image).astype(np.float32)
        for mask in sample.masks.values():
            ring = np.zeros_like(mask)
            ys, xs = np.nonzero(mask)
            ring[max(ys.min() - 4, 0) : ys.max() + 5, max(xs.min() - 4, 0) : xs.max() + 5] = True
            ring &= ~mask
            inside = image[mask].mean(0)
            contrasts.append(np.abs(inside - image[ring].mean(0)).max())
            spreads.append(np.abs(image[mask] - inside).mean())
    assert np.median(contrasts) > 40 and np.mean(np.array(contrasts) > 20) > 0.9
    assert np.median(spreads) < 25


def test_classes_co_occur() -> None:
    """A cross usually comes with a circle (a shortcut a model may learn), other pairs less so."""
    labels = torch.stack([generate(TEST_SEED + 1, i).labels for i in range(300)])
    circle, cross, square = (labels[:, CLASSES.index(c)].bool() for c in ("circle", "cross", "square"))
    assert circle[cross].float().mean() > 0.6
    assert circle[~cross].float().mean() < 0.5 and square[cross].float().mean() < 0.4


def test_dataset_yields_cli_preprocessed_tensors() -> None:
    """The training dataset applies the CLI pipeline: resize to 128x128, /255, normalise 0.5/0.5."""
    x, y = ShapesDataset(TEST_SEED, 2, preprocess)[1]
    sample = generate(TEST_SEED, 1)
    assert x.shape == (3, *INPUT_SIZE) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    torch.testing.assert_close(x, preprocess(to_tensor(sample.image)))
    assert torch.equal(y, sample.labels)


def test_shipped_weights_load_safely_and_head_is_affine() -> None:
    """weights_only loading works, the file is small, and after features.4 comes flatten + linear."""
    assert WEIGHTS_PATH.stat().st_size < 5 * 2**20
    state = torch.load(WEIGHTS_PATH, map_location="cpu", weights_only=True)
    model = DemoNet()
    model.load_state_dict(state)
    shipped = load_demo_model()
    assert not shipped.training
    assert [type(m) for m in shipped.head] == [nn.Flatten, nn.Linear]
    assert LABELS_PATH.read_text().split() == list(CLASSES)
    x = torch.randn(2, 3, *INPUT_SIZE, generator=torch.Generator().manual_seed(0))
    features = shipped.features(x).detach().requires_grad_()
    assert features.shape == (2, 64, 8, 8)
    score = shipped.head(features)[:, 0]
    (grads,) = torch.autograd.grad(score.sum(), features)
    torch.testing.assert_close(
        (grads * features).sum((1, 2, 3)), score - shipped.head[1].bias[0], rtol=1e-5, atol=1e-4
    )


def test_average_precision_and_f1_known_values() -> None:
    """AP of hand-checked rankings, tied scores as one threshold; F1 from counts."""
    targets = torch.tensor([True, False, True, False])
    assert average_precision(torch.tensor([0.9, 0.8, 0.7, 0.6]), targets) == pytest.approx(5 / 6)
    assert average_precision(torch.tensor([0.7, 0.9, 0.8, 0.1]), targets) == pytest.approx(7 / 12)
    assert average_precision(torch.ones(4), targets) == pytest.approx(0.5)
    assert np.isnan(average_precision(torch.tensor([0.3, 0.9, 0.1]), torch.zeros(3, dtype=torch.bool)))
    assert f1_score(torch.tensor([True, True, False, False]), targets) == pytest.approx(0.5)


def test_shipped_model_quality() -> None:
    """The shipped model is accurate on fresh images (the full report: python -m ...demo.quality)."""
    quality = measure(n=200, seed=TEST_SEED)
    assert quality.mean_ap >= 0.9, quality
    assert min(quality.f1.values()) >= 0.8, quality


def test_write_samples(tmp_path: Path) -> None:
    """The sample writer produces images, one L-mode 0/255 mask per present class, labels.json."""
    labels = write_samples(tmp_path / "images", tmp_path / "masks", count=2, seed=TEST_SEED)
    assert labels == json.loads((tmp_path / "masks" / "labels.json").read_text())
    assert labels["sample_00.png"] == generate(TEST_SEED, 0).names
    check_sample_folders(tmp_path / "images", tmp_path / "masks")


def test_shipped_samples_are_consistent() -> None:
    """sample_images and sample_masks agree and cover every class, alone and together."""
    labels = check_sample_folders(ROOT / "sample_images", ROOT / "sample_masks")
    assert 16 <= len(labels) <= 24
    assert {c for names in labels.values() for c in names} == set(CLASSES)
    assert any(len(names) > 1 for names in labels.values())
    assert any(names == ["cross"] for names in labels.values()), "a cross without its usual circle"


def check_sample_folders(images: Path, masks: Path) -> dict[str, list[str]]:
    """Assert that every image has masks for exactly its labels, with matching sizes."""
    labels = json.loads((masks / "labels.json").read_text())
    assert sorted(labels) == sorted(p.name for p in images.glob("*.png"))
    for name, names in labels.items():
        with Image.open(images / name) as image:
            assert image.mode == "RGB"
            size = image.size
        folder = masks / Path(name).stem
        assert sorted(p.stem for p in folder.glob("*.png")) == sorted(names) and names
        for class_name in names:
            with Image.open(folder / f"{class_name}.png") as mask:
                values = np.asarray(mask)
                assert mask.mode == "L" and mask.size == size
                assert set(np.unique(values)) == {0, 255}
    return labels


def test_training_is_deterministic_and_writes_atomically(tmp_path: Path) -> None:
    """Two short trainings with one seed give identical weights; the save leaves no temp file."""
    first = train(seed=3, images=64, epochs=1, batch_size=32, lr=1e-3, workers=0).state_dict()
    second = train(seed=3, images=64, epochs=1, batch_size=32, lr=1e-3, workers=0).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    save_atomic(first, tmp_path / "net.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["net.pt"]
    DemoNet().load_state_dict(torch.load(tmp_path / "net.pt", weights_only=True))
