"""eval's localisation metrics against an independent implementation (Quantus), pair for pair, on the demo
model's maps of the shipped sample images registered onto the originals, as `hirescam eval` scores them."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hirescam_cli import Explainer
from hirescam_cli.demo.net import load_demo_model
from hirescam_cli.engine.methods import METHODS
from hirescam_cli.metrics import localisation
from hirescam_cli.modalities.images import Images, Preprocess

quantus = pytest.importorskip("quantus")
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # Quantus's 0 / 0

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["circle", "square", "triangle", "star", "cross"]
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def demo_pairs(preprocess: Preprocess, count: int = 12):
    """Every method's maps on the originals, with their pixels, and the masks of every (sample image,
    masked class) of the first `count` sample images."""
    images = Images(preprocess)
    labels = json.loads((ROOT / "sample_masks" / "labels.json").read_text())
    names = {name: labels[name] for name in sorted(labels)[:count]}
    loaded = [images.load((ROOT / "sample_images" / name).read_bytes()) for name in sorted(names)]
    views = images.collate([view for _, view in loaded])
    rows, classes, masks = [], [], []
    for row, name in enumerate(sorted(names)):
        for label in names[name]:
            rows.append(row)
            classes.append(LABELS.index(label))
            with Image.open(ROOT / "sample_masks" / Path(name).stem / f"{label}.png") as image:
                masks.append(np.asarray(image.convert("L")) > 127)
    x = torch.stack([tensor for tensor, _ in loaded])[rows]
    with Explainer(load_demo_model(), "features") as explainer:
        result = explainer(x, methods=tuple(METHODS), classes=torch.tensor(classes)[:, None])
    maps = {name: images.to_original(m[:, 0], views, rows) for name, m in result.maps.items()}
    return maps, masks


def quantus_scores(maps: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Quantus's pointing game, relevance mass and rank accuracy and AUC of maps (M, H, W) on one mask.

    NaN pixels (cut off by the crop) become the lowest value for the rankings and 0 for the mass. Rank
    accuracy comes with the values Quantus gives when ties are broken for and against the mask."""
    lowest = np.nanmin(maps, axis=(1, 2), keepdims=True) - 1
    ranked = np.where(np.isnan(maps), lowest, maps)[:, None].astype(np.float64)
    positive = np.clip(np.nan_to_num(maps, nan=0.0), 0, None)[:, None].astype(np.float64)
    masks = np.broadcast_to(mask, maps.shape)[:, None].copy()
    gaps = np.diff(np.unique(ranked))
    nudge = masks * gaps.min() / 4  # smaller than any gap: orders only the ties
    plain = {"abs": False, "normalise": False, "disable_warnings": True, "display_progressbar": False}
    x = np.zeros((len(maps), 3, *mask.shape), np.float32)
    y = np.zeros(len(maps), int)

    def score(metric, a):
        return np.asarray(metric(**plain)(None, x, y, a_batch=a, s_batch=masks, channel_first=True), float)

    return {
        "pointing_game": score(quantus.PointingGame, ranked),
        "relevance_mass_accuracy": score(quantus.RelevanceMassAccuracy, positive),
        "relevance_rank_accuracy": score(quantus.RelevanceRankAccuracy, ranked),
        "rank_accuracy_ties_against": score(quantus.RelevanceRankAccuracy, ranked - nudge),
        "rank_accuracy_ties_for": score(quantus.RelevanceRankAccuracy, ranked + nudge),
        "roc_auc": score(quantus.AUC, ranked),
    }


@pytest.mark.parametrize(
    "preprocess",
    [Preprocess((128, 128), None, *HALF), Preprocess(144, 128, *HALF)],  # the demo's; a crop cutting pixels
    ids=["exact-resize", "crop"],
)
def test_localisation_agrees_with_quantus_pair_for_pair(preprocess):
    """Pointing game, relevance mass accuracy and AUC equal Quantus's on every pair; so does rank
    accuracy wherever the |mask|-th place is not shared by tied pixels inside and outside the mask.
    Where it is, Quantus's value depends on numpy's (unstable) sort order, and ours is the mean over
    the orders of the tie: both lie between the tie broken against and for the mask."""
    maps, masks = demo_pairs(preprocess)
    ours = {}
    for name, (registered, pixels) in maps.items():
        padded = torch.zeros(pixels.shape, dtype=torch.bool)
        for i, mask in enumerate(masks):
            padded[i, : mask.shape[0], : mask.shape[1]] = torch.from_numpy(mask)
        ours[name] = {k: v.double().numpy() for k, v in localisation(registered, padded, pixels).items()}
    theirs: dict[str, dict[str, np.ndarray]] = {name: {} for name in maps}
    uncovered = 0
    for i, mask in enumerate(masks):
        height, width = mask.shape
        stack = np.stack([registered[i, :height, :width].numpy() for registered, _ in maps.values()])
        uncovered += np.isnan(stack[0]).sum()
        for key, values in quantus_scores(stack, mask).items():
            for method, value in zip(maps, values, strict=True):
                theirs[method].setdefault(key, np.empty(len(masks)))[i] = value
    assert (uncovered > 0) == (preprocess.crop is not None)
    assert len(masks) >= 20
    close = {"rtol": 1e-5, "atol": 1e-9}
    tied = 0
    for method in maps:
        for key in ("pointing_game", "relevance_mass_accuracy", "roc_auc"):
            np.testing.assert_allclose(ours[method][key], theirs[method][key], **close, err_msg=key)
        rank, quantus_rank = (
            ours[method]["relevance_rank_accuracy"],
            theirs[method]["relevance_rank_accuracy"],
        )
        low, high = theirs[method]["rank_accuracy_ties_against"], theirs[method]["rank_accuracy_ties_for"]
        exact = low == high
        np.testing.assert_allclose(rank[exact], quantus_rank[exact], **close)
        assert (low - 1e-6 <= rank).all() and (rank <= high + 1e-6).all()  # ours are float32
        assert (low <= quantus_rank).all() and (quantus_rank <= high).all()
        tied += (~exact).sum()
    assert tied <= 0.05 * len(masks) * len(maps)
    rank = np.stack([ours[m]["relevance_rank_accuracy"] for m in maps])
    assert (rank.max(0) > rank.min(0)).mean() > 0.5  # the methods differ on most pairs: not a vacuous check
