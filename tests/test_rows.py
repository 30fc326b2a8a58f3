"""Prefix rows: after a token layer, the backward skips rows that cannot reach the scores, exactly."""

import sys
from pathlib import Path

import pytest
import torch
from determinism import noise, seeded
from torch import nn

from hirescam_cli import METHODS, Explainer
from hirescam_cli.engine.rows import Rows

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from test_transformers import by_hand, timm_deit, timm_vit  # noqa: E402
from tiny_models import tiny_vit  # noqa: E402

# model -> (the modules cut after auto's layer, the rows kept)
CUT = {
    "torchvision_vit": (
        tiny_vit,
        (
            "encoder.layers.encoder_layer_1.self_attention",  # called as attention(x, x, x): its query rows
            "encoder.layers.encoder_layer_1.ln_2",
            "encoder.layers.encoder_layer_1.mlp",
            "encoder.ln",
        ),
        1,
    ),
    "timm_vit_registers": (timm_vit, ("blocks.1.attn.proj", "blocks.1.norm2", "blocks.1.mlp", "norm"), 5),
    "timm_deit_distilled": (timm_deit, ("blocks.1.attn.proj", "blocks.1.norm2", "blocks.1.mlp", "norm"), 2),
}


def uncut(explainer: Explainer) -> Explainer:
    """The explainer with every module's backward over all rows, as autograd alone runs it."""
    explainer.rows.of = lambda _x: Rows()
    return explainer


@pytest.mark.parametrize("family", CUT)
def test_a_class_token_head_cuts_the_modules_after_the_layer_and_changes_no_map(family):
    make, modules, keep = CUT[family]
    x = noise(3, 3, 32, 32, seed=2)
    with Explainer(make()) as cut, uncut(Explainer(make())) as full:
        got = cut(x, methods=tuple(METHODS), top_k=3)
        expected = full(x, methods=tuple(METHODS), top_k=3)
        assert cut.rows.of(x) == Rows(modules, keep)
        with torch.inference_mode():
            inference = cut.model(x)
    # a cut module's values come from its forward without a graph, as in inference (for an
    # nn.MultiheadAttention, its fused path: the same function, rounded otherwise than the one autograd runs)
    assert torch.equal(got.logits, inference) and torch.equal(got.classes, expected.classes)
    assert (got.logits - expected.logits).abs().max() <= 1e-6 * (1 + expected.logits.abs().max())
    for name in METHODS:
        scale = 1 + expected.maps[name].abs().max()
        # the attention's query rows run through other kernels, so the gradients round otherwise (~1e-7
        # relative); Grad-CAM++ is cubic in them and divides by a sum of them, which grows that up to 10x
        tolerance = 1e-5 if name == "gradcam++" else 1e-6
        assert (got.maps[name] - expected.maps[name]).abs().max() <= tolerance * scale, name
    scale = 1 + expected.prefix_sum.abs().max()
    assert (got.prefix_sum - expected.prefix_sum).abs().max() <= 1e-6 * scale
    assert got.guarantee == expected.guarantee


def test_nothing_is_cut_behind_a_head_that_reads_every_token():
    make = lambda: timm_vit(global_pool="avg", fc_norm=False)  # noqa: E731 - the average of the patch tokens
    x = noise(2, 3, 32, 32)
    with Explainer(make(), "blocks.1.norm1") as explainer:
        result = explainer(x)
        assert explainer.rows.of(x) == Rows()
    expected = by_hand(make(), "blocks.1.norm1", x, result.layout)
    scale = 1 + expected["hirescam"].abs().max()
    assert (result.maps["hirescam"][:, 0] - expected["hirescam"]).abs().max() <= 1e-6 * scale


def test_an_earlier_block_is_not_cut_where_its_rows_feed_a_later_attention():
    layer = "encoder.layers.encoder_layer_0.ln_1"
    x = noise(2, 3, 32, 32)
    with Explainer(tiny_vit(), layer) as explainer:
        result = explainer(x, top_k=2)
        cut = explainer.rows.of(x)
    assert cut.modules == (
        "encoder.layers.encoder_layer_1.self_attention",
        "encoder.layers.encoder_layer_1.ln_2",
        "encoder.layers.encoder_layer_1.mlp",
        "encoder.ln",
    )
    # against the float64 truth: two blocks' backward in float32, the cut attention through its own kernels,
    # lands 1.2e-6 to 1.7e-6 of the magnitude off it on some CPUs (plain autograd: 5e-7), by thread count
    expected = by_hand(tiny_vit().double(), layer, x.double(), result.layout)
    for name in ("hirescam", "gradcam"):
        scale = 1 + expected[name].abs().max()
        assert (result.maps[name][:, 0].double() - expected[name]).abs().max() <= 1e-5 * scale, name


class Tokens(nn.Module):
    """Patch conv -> class token + 4x4 patch tokens -> norm (the target) -> `after` -> a head on them."""

    num_prefix_tokens = 1

    @seeded()
    def __init__(self, after: nn.Module, head):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.norm = nn.LayerNorm(8)
        self.after = after
        self.pick = head
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], 1)
        return self.head(self.pick(self.after(self.norm(tokens))))


def class_token(tokens):
    return tokens[:, 0]


class Strongest(nn.Module):
    """The token whose first channel (plus a bonus for the class token) is largest: the data picks the row."""

    def forward(self, tokens):
        bonus = torch.zeros(tokens.shape[1]).index_fill_(0, torch.tensor([0]), 100.0)
        return tokens[torch.arange(len(tokens)), (tokens[..., 0] + bonus).argmax(1)]


class LengthScaled(nn.Module):
    """Per token, but scaled by the sequence length: it cannot run on fewer rows."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        return self.linear(x) * x.shape[1] / 17


def test_an_affine_head_behind_a_cut_keeps_its_guarantee_and_completeness():
    model = Tokens(nn.Linear(8, 8), class_token)
    x = noise(4, 3, 32, 32)
    with Explainer(model, "norm") as explainer:
        result = explainer(x, top_k=3)
        assert explainer.rows.of(x) == Rows(("after",), 1)
    assert result.guarantee
    total = result.scores - result.baseline
    assert result.completeness_gap.abs().max() <= 1e-5 * (total.abs().max() + 1)
    expected = by_hand(model, "norm", x, result.layout)
    assert (result.prefix_sum[:, 0] - expected["prefix"]).abs().max() <= 1e-6 * (
        1 + expected["prefix"].abs().max()
    )


@pytest.mark.parametrize(
    "model",
    [
        Tokens(nn.Linear(8, 8), Strongest()),  # the row is read where the data says: NaN rows win argmax
        Tokens(LengthScaled(), class_token),  # rows alone, but not the same function on fewer of them
        Tokens(
            nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), class_token
        ),  # mixes rows
    ],
    ids=["rows-chosen-by-the-data", "length-dependent", "attention"],
)
def test_modules_that_cannot_be_cut_exactly_are_not(model):
    x = noise(3, 3, 32, 32, seed=3)
    with Explainer(model, "norm") as explainer:
        result = explainer(x)
        cut = explainer.rows.of(x)
    assert "after" not in cut.modules
    expected = by_hand(model, "norm", x, result.layout)
    for name in ("hirescam", "gradcam"):
        scale = 1 + expected[name].abs().max()
        assert (result.maps[name][:, 0] - expected[name]).abs().max() <= 1e-6 * scale, name


class Attend(nn.Module):
    """attention(x, x, x) on the tokens; with `weights`, the head also reads its attention weights."""

    @seeded(5)
    def __init__(self, weights: bool):
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.weights = weights

    def forward(self, x):
        out, weights = self.attention(x, x, x, need_weights=self.weights)
        return out if weights is None else out + weights.sum(-1, keepdim=True) * x


@pytest.mark.parametrize("weights", [False, True], ids=["values-only", "weights-read"])
def test_an_attention_is_cut_to_its_query_rows_unless_its_weights_leave_it(weights):
    model = Tokens(Attend(weights), class_token)
    x = noise(3, 3, 32, 32, seed=4)
    with Explainer(model, "norm") as explainer:
        result = explainer(x)
        cut = explainer.rows.of(x)
    # its keys and values are its other arguments, so the class token's query row is all it needs; an
    # output that also holds the attention weights is never cut (the weights would lose their gradient)
    assert ("after.attention" in cut.modules) is not weights
    expected = by_hand(model, "norm", x, result.layout)
    for name in ("hirescam", "gradcam"):
        scale = 1 + expected[name].abs().max()
        assert (result.maps[name][:, 0] - expected[name]).abs().max() <= 1e-6 * scale, name
