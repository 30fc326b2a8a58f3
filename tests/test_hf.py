"""Hugging Face models (`hf:`): tiny random models of every family, saved with save_pretrained in the test
and loaded with no network; their preprocessing, labels, layers, maps and guarantees."""

import io
import json
import math
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as hf
from determinism import assert_close_scaled, noise, seeded
from PIL import Image
from safetensors.torch import load_file, save_file
from test_cli import rgb, run
from test_faults import folder, tree
from test_scale import finish, launch

from hirescam_cli import Explainer
from hirescam_cli.config import ConfigError, ModelConfig, PreprocessConfig
from hirescam_cli.engine.layers import choose_auto, probe_input, trace_layers
from hirescam_cli.modalities.image_files import decode
from hirescam_cli.modalities.images import make_preprocess
from hirescam_cli.sources import ModelError, load_model
from hirescam_cli.sources.hf_models import labels_of, preset_of

TOKENS = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
TOKENS |= {"image_size": 32, "patch_size": 8, "num_labels": 3}
IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
SQUARE = {"size": {"height": 32, "width": 32}}
SMALL_CONVNEXT = {"size": {"shortest_edge": 32}, "crop_pct": 0.875, **IMAGENET}  # resize 36, crop 32


def _swin() -> hf.SwinConfig:
    return hf.SwinConfig(
        image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4, num_labels=3
    )


# family -> (model class, its config, its image processor at a 32 x 32 input, prefix tokens,
#            what `auto` picks, a layer whose head is affine (None: there is none))
FAMILIES = {
    "vit": (
        hf.ViTForImageClassification,
        lambda: hf.ViTConfig(**TOKENS),
        lambda: hf.ViTImageProcessor(**SQUARE),
        1,
        "vit.layers.1.layernorm_before",
        "vit.layernorm",
    ),
    "deit-distilled": (
        hf.DeiTForImageClassificationWithTeacher,
        lambda: hf.DeiTConfig(**TOKENS),
        lambda: hf.DeiTImageProcessor(
            size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32}
        ),
        2,
        "deit.layers.1.layernorm_before",
        "deit.layernorm",
    ),
    "beit": (  # mean pooling of the patches, then a norm: no affine head after any grid
        hf.BeitForImageClassification,
        lambda: hf.BeitConfig(**TOKENS),
        lambda: hf.BeitImageProcessor(**SQUARE),
        1,
        "beit.layernorm",
        None,
    ),
    "beit-class-token": (
        hf.BeitForImageClassification,
        lambda: hf.BeitConfig(**TOKENS, use_mean_pooling=False),
        lambda: hf.BeitImageProcessor(**SQUARE),
        1,
        "beit.layers.1.layernorm_before",
        "beit.layernorm",
    ),
    "dinov2-registers": (  # the head reads the class token and the mean of the patch tokens
        hf.Dinov2WithRegistersForImageClassification,
        lambda: hf.Dinov2WithRegistersConfig(**TOKENS, num_register_tokens=4),
        lambda: hf.BitImageProcessor(
            size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, **IMAGENET
        ),
        5,
        "dinov2_with_registers.layernorm",
        "dinov2_with_registers.layernorm",
    ),
    "swin": (
        hf.SwinForImageClassification,
        _swin,
        lambda: hf.ViTImageProcessor(**SQUARE, resample=3, **IMAGENET),
        0,
        "swin.layernorm",
        "swin.layernorm",
    ),
    "convnext": (  # pooled, then a norm: not affine
        hf.ConvNextForImageClassification,
        lambda: hf.ConvNextConfig(num_stages=2, hidden_sizes=[12, 24], depths=[1, 1], num_labels=3),
        lambda: hf.ConvNextImageProcessor(**SMALL_CONVNEXT),
        None,
        "convnext.encoder.stages.1",
        None,
    ),
    "resnet": (
        hf.ResNetForImageClassification,
        lambda: hf.ResNetConfig(embedding_size=8, hidden_sizes=[12, 24], depths=[1, 1], num_labels=3),
        lambda: hf.ConvNextImageProcessor(**SMALL_CONVNEXT | {"resample": 2}),
        None,
        "resnet.encoder.stages.1",
        "resnet.encoder.stages.1",
    ),
}


def save_family(family: str, folder: Path, **config) -> Path:
    """A tiny random model of `family` with its image processor, as save_pretrained writes them."""
    cls, make_config, make_processor, *_ = FAMILIES[family]
    model_config = make_config()
    for key, value in config.items():
        setattr(model_config, key, value)
    with seeded():
        cls(model_config).save_pretrained(folder)
    make_processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {family: save_family(family, root / family) for family in FAMILIES}


def hand_maps(folder: Path, layer: str, prefix: int, x: torch.Tensor, classes: torch.Tensor):
    """HiResCAM and Grad-CAM (B, T, h, w) by plain autograd on the model as transformers loads it."""
    model = hf.AutoModelForImageClassification.from_pretrained(folder).eval()
    seen = []
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(
        lambda _m, _i, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    logits = model(pixel_values=x).logits
    handle.remove()
    (a,) = seen
    hires, grad = [], []
    for t in range(classes.shape[1]):
        (g,) = torch.autograd.grad(logits.gather(1, classes[:, t : t + 1]).sum(), a, retain_graph=True)
        if a.ndim == 3:  # tokens (B, P + h*w, K) -> (B, K, h, w)
            side = math.isqrt(a.shape[1] - prefix)
            a_map, g_map = (v[:, prefix:].transpose(1, 2).unflatten(2, (side, side)) for v in (a, g))
        else:
            a_map, g_map = a, g
        hires.append((g_map * a_map).sum(1))
        grad.append((g_map.mean((2, 3), keepdim=True) * a_map).sum(1))
    return torch.stack(hires, 1).detach(), torch.stack(grad, 1).detach()


@pytest.mark.parametrize("family", FAMILIES)
def test_raw_maps_equal_a_hand_computation_at_the_layer_auto_picks(family, folders):
    *_, prefix, auto, _ = FAMILIES[family]
    loaded = load_model(ModelConfig(arch=f"hf:{folders[family]}"))
    x = noise(2, 3, 32, 32, seed=1)
    with Explainer(loaded.module) as explainer:
        result = explainer(x, methods=("hirescam", "gradcam"), top_k=2)
    assert result.target_layer == auto
    assert result.layout.prefix_tokens == (prefix or 0)
    assert not result.zero_gradient.any()  # auto never picks a layer the scores do not depend on
    hires, grad = hand_maps(folders[family], auto, prefix or 0, x, result.classes)
    assert_close_scaled(result.maps["hirescam"], hires, rel=1e-6)
    assert_close_scaled(result.maps["gradcam"], grad, rel=1e-6)
    traced = trace_layers(loaded.module, probe_input(x), probe=True)
    assert choose_auto(traced) == auto
    assert next(i for i in traced if i.name == auto).grid_gradient


@pytest.mark.parametrize("family", FAMILIES)
def test_completeness_is_exact_where_the_head_is_affine_and_reported_otherwise(family, folders):
    *_, auto, affine = FAMILIES[family]
    loaded = load_model(ModelConfig(arch=f"hf:{folders[family]}"))
    x = noise(2, 3, 32, 32, seed=2)
    if affine is not None:
        with Explainer(loaded.module, affine) as explainer:
            result = explainer(x, top_k=3)
        assert result.guarantee
        total = (result.scores - result.baseline).abs().max()
        assert float(result.completeness_gap.abs().max()) <= 1e-5 * float(total)
    if affine != auto:  # attention, or a norm after the pooling, lies between the grid and the logits
        with Explainer(loaded.module) as explainer:
            assert not explainer(x, top_k=3).guarantee


def test_class_token_heads_put_the_whole_score_on_the_prefix_tokens(folders):
    """At the final norm of a ViT the map is zero; DeiT's two heads read its two prefix tokens."""
    for family in ("vit", "deit-distilled"):
        loaded = load_model(ModelConfig(arch=f"hf:{folders[family]}"))
        with Explainer(loaded.module, FAMILIES[family][5]) as explainer:
            result = explainer(noise(2, 3, 32, 32, seed=3), top_k=2)
        assert result.guarantee and bool(result.zero_gradient.all())
        assert_close_scaled(result.prefix_sum, result.scores - result.baseline, rel=1e-5)


# --- preprocessing --------------------------------------------------------------------------------

# the image processors of the hub's checkpoints of each family, at their real sizes
PROCESSORS = {
    "vit": lambda: hf.ViTImageProcessor(size={"height": 224, "width": 224}),
    "deit-distilled": lambda: hf.DeiTImageProcessor(
        size={"height": 256, "width": 256}, crop_size={"height": 224, "width": 224}, resample=3, **IMAGENET
    ),
    "beit": lambda: hf.BeitImageProcessor(size={"height": 224, "width": 224}, resample=2),
    "dinov2-registers": lambda: hf.BitImageProcessor(
        size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3, **IMAGENET
    ),
    "swin": lambda: hf.ViTImageProcessor(size={"height": 224, "width": 224}, resample=3, **IMAGENET),
    "convnext": lambda: hf.ConvNextImageProcessor(size={"shortest_edge": 224}, resample=3, **IMAGENET),
    "convnext-384": lambda: hf.ConvNextImageProcessor(size={"shortest_edge": 384}, resample=3, **IMAGENET),
    "resnet": lambda: hf.ConvNextImageProcessor(size={"shortest_edge": 224}, resample=2, **IMAGENET),
    "no-rescale": lambda: hf.ViTImageProcessor(
        size={"height": 224, "width": 224}, do_rescale=False, image_mean=[127.5] * 3, image_std=[64.0] * 3
    ),
}
# (width, height): 1024 x 683 makes an odd margin of 159 pixels at a 256 shortest edge, where the
# processors' centre crop (floor) and torchvision's (round half to even) part
PICTURES = [(640, 480), (1024, 683), (333, 500)]


@pytest.mark.parametrize("name", PROCESSORS)
def test_model_input_equals_the_image_processors_pixel_values(name, tmp_path):
    family = name if name in FAMILIES else "vit"
    folder = save_family("convnext" if name.startswith("convnext") else family, tmp_path / "model")
    PROCESSORS[name]().save_pretrained(folder)
    processor = hf.AutoImageProcessor.from_pretrained(folder)
    loaded = load_model(ModelConfig(arch=f"hf:{folder}"), load_weights=False)
    preprocess = make_preprocess(PreprocessConfig(), loaded.transforms)
    rng = np.random.default_rng(0)
    for width, height in PICTURES:
        picture = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        data = io.BytesIO()
        picture.save(data, "PNG")
        ours, _ = preprocess(torch.from_numpy(decode(data.getvalue(), None, preprocess.resize)))
        theirs = processor(images=picture, return_tensors="pt")["pixel_values"][0]
        assert ours.shape == theirs.shape
        assert_close_scaled(ours, theirs, rel=1e-6)


def test_config_keys_override_the_processor_and_unknown_resizes_are_refused():
    preset = preset_of(PROCESSORS["dinov2-registers"](), "m")
    mine = make_preprocess(PreprocessConfig(resize=300, interpolation="bilinear"), preset)
    assert (mine.resize, mine.crop, mine.interpolation, mine.crop_rounding) == (
        300,
        (224, 224),
        "bilinear",
        "floor",
    )
    lanczos = preset_of(hf.ViTImageProcessor(resample=1), "m")
    with pytest.raises(ConfigError, match=r"resamples with lanczos.*set preprocess\.interpolation"):
        make_preprocess(PreprocessConfig(), lanczos)
    assert make_preprocess(PreprocessConfig(interpolation="bicubic"), lanczos).interpolation == "bicubic"
    longest = hf.ViTImageProcessor(size={"shortest_edge": 200, "longest_edge": 300})
    with pytest.raises(ModelError, match=r"set preprocess\.resize and preprocess\.crop"):
        preset_of(longest, "m")


# --- labels and problem types ----------------------------------------------------------------------


def test_labels_come_from_id2label_and_placeholders_are_shown_as_ids(tmp_path):
    assert labels_of({0: "cat", 1: "LABEL_1", 2: "dog"}, 3) == ["cat", "1", "dog"]
    assert labels_of({0: "LABEL_0", 1: "LABEL_1"}, 2) is None
    folder = save_family("vit", tmp_path / "m", id2label={0: "tabby", 1: "LABEL_1", 2: "robin"})
    loaded = load_model(ModelConfig(arch=f"hf:{folder}"), load_weights=False)
    assert loaded.labels == ["tabby", "1", "robin"] and not loaded.multilabel


def test_a_multi_label_model_uses_sigmoids_and_allows_a_threshold(tmp_path, capsys):
    folder = save_family("vit", tmp_path / "m", problem_type="multi_label_classification")
    assert load_model(ModelConfig(arch=f"hf:{folder}"), load_weights=False).multilabel
    rgb(48, 40).save(tmp_path / "x.png")
    args = ["explain", tmp_path / "x.png", "-o", tmp_path / "out", "--model", f"hf:{folder}"]
    code, _, err = run([*args, "--threshold", "0.0", "--workers", "0", "-q"], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "x.png" / "summary.json").read_text())
    assert sorted(t["class"] for t in summary["targets"]) == [0, 1, 2]
    for target in summary["targets"]:  # sigmoids, not a softmax
        assert target["probability"] == pytest.approx(1 / (1 + math.exp(-target["logit"])), rel=1e-5)


# --- where models come from ------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Every connection attempt is recorded and fails, as offline."""
    attempts = []

    def refuse(address, *_args, **_kwargs):
        attempts.append(address)
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def test_a_hub_name_not_in_the_cache_fails_at_once_offline(tmp_path, capsys, monkeypatch, no_network):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    rgb(20, 20).save(tmp_path / "x.png")
    args = ["explain", tmp_path / "x.png", "-o", tmp_path / "out", "--model", "hf:someone/tiny-vit"]
    code, _, err = run(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "cannot get Hugging Face model someone/tiny-vit: it is not in the local cache" in err
    assert "huggingface.co cannot be reached" in err and "hf download someone/tiny-vit" in err
    assert no_network == [("huggingface.co", 443)]  # one try, no retries
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match=r"offline mode is on \(HF_HUB_OFFLINE\)"):
        load_model(ModelConfig(arch="hf:someone/tiny-vit"))
    assert len(no_network) == 1  # offline mode does not even try


def test_a_hub_name_in_the_cache_loads_with_no_network(folders, tmp_path, monkeypatch, no_network):
    import huggingface_hub.constants

    cache = tmp_path / "cache"
    repo = cache / "models--someone--tiny-vit"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folders["vit"], repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    loaded = load_model(ModelConfig(arch="hf:someone/tiny-vit"))
    reference = load_model(ModelConfig(arch=f"hf:{folders['vit']}"))
    x = noise(1, 3, 32, 32)
    assert torch.equal(loaded.module(x), reference.module(x))
    assert loaded.name == "hf:someone/tiny-vit" and no_network == []


def test_pickled_weights_are_refused_unless_allowed(folders, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(folders["vit"], folder)
    reference = load_model(ModelConfig(arch=f"hf:{folders['vit']}")).module
    (folder / "model.safetensors").unlink()
    torch.save(reference.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"pickled weights only \(pytorch_model\.bin\): refused"):
        load_model(ModelConfig(arch=f"hf:{folder}"))
    allowed = load_model(ModelConfig(arch=f"hf:{folder}", allow_pickle=True)).module
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, allowed.state_dict()[name])


def test_models_that_need_their_own_code_or_lack_weights_are_refused(folders, tmp_path):
    remote = tmp_path / "remote"
    shutil.copytree(folders["vit"], remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageClassification": "modeling_mine.MyNet"}
    (remote / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelError, match=r"^hf:.*remote needs its own code \(trust_remote_code\), which hirescam never runs"
    ):
        load_model(ModelConfig(arch=f"hf:{remote}"))
    bare = tmp_path / "bare"
    shutil.copytree(folders["vit"], bare)
    (bare / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"^hf:.*bare has no weights"):
        load_model(ModelConfig(arch=f"hf:{bare}"))
    headless = tmp_path / "headless"  # a backbone checkpoint: the classifier would start at random
    shutil.copytree(folders["vit"], headless)
    state = load_file(headless / "model.safetensors")
    backbone = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    save_file(backbone, headless / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ModelError, match=r"do not cover the classifier it builds \(missing or mismatched: classifier"
    ):
        load_model(ModelConfig(arch=f"hf:{headless}"))
    assert load_model(ModelConfig(arch=f"hf:{bare}", weights="none")).random_weights
    reference = load_model(ModelConfig(arch=f"hf:{folders['vit']}")).module
    save_file(reference.state_dict(), tmp_path / "vit.safetensors")
    loaded = load_model(ModelConfig(arch=f"hf:{bare}", checkpoint=tmp_path / "vit.safetensors"))
    x = noise(1, 3, 32, 32)
    assert torch.equal(loaded.module(x), reference(x)) and not loaded.random_weights
    with pytest.raises(ModelError, match=r"no such folder"):
        load_model(ModelConfig(arch=f"hf:{tmp_path / 'missing'}"))


# --- the command line ------------------------------------------------------------------------------


def pictures(folder: Path) -> None:
    folder.mkdir()
    rgb(64, 48, 0).save(folder / "a.png")
    rgb(40, 60, 1).save(folder / "b.jpg")


def test_explain_resume_report_and_eval_a_hugging_face_vit(folders, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(folders["deit-distilled"], tmp_path / "deit")
    pictures(tmp_path / "images")
    out = tmp_path / "out"
    args = ["explain", "images", "-o", out, "--model", "hf:deit", "--top-k", "2", "--save-raw", "--signed"]
    code, _, err = run([*args, "--workers", "0", "--report"], capsys)
    assert code == 0, err
    info = json.loads((out / "run.json").read_text())
    assert info["target_layer"] == "deit.layers.1.layernorm_before"
    assert info["layout"] == {"kind": "tokens", "grid": [4, 4], "prefix_tokens": 2}
    assert info["model"] == f"hf:{tmp_path / 'deit'}"  # a folder, made absolute
    assert "crop_rounding='floor'" in info["preprocess"]
    for name in ("a.png", "b.jpg"):
        summary = json.loads((out / name / "summary.json").read_text())
        assert len(summary["targets"]) == 2
        raw = np.load(out / summary["targets"][0]["maps"]["hirescam"]["raw"])
        assert raw.shape == (4, 4)
    assert (out / "report" / "index.html").is_file()
    before = {p: p.read_bytes() for p in out.rglob("*-*.*")}
    code, _, err = run([*args, "--workers", "0", "-q"], capsys)
    assert code == 0, err
    assert [json.loads(line)["status"] for line in (out / "results.jsonl").read_text().splitlines()] == [
        "skipped"
    ] * 2
    assert {p: p.read_bytes() for p in before} == before
    code, text, err = run(["eval", "images", "--model", "hf:deit", "--workers", "0"], capsys)
    assert code == 0, err
    assert "hirescam" in text


def test_layers_lists_a_hugging_face_model_offline(folders, capsys, no_network):
    code, text, err = run(["layers", "--model", f"hf:{folders['dinov2-registers']}"], capsys)
    assert code == 0, err
    lines = text.splitlines()
    assert lines[0].endswith("'auto' picks dinov2_with_registers.layernorm")
    row = next(line for line in lines if line.startswith("dinov2_with_registers.layernorm "))
    assert "tokens" in row and "4x4" in row and " 5 " in row and "<- auto" in row
    assert no_network == []


def test_amp_runs_a_swin_on_the_cpu(folders, tmp_path, capsys):
    pictures(tmp_path / "images")
    args = ["explain", tmp_path / "images", "-o", tmp_path / "out", "--model", f"hf:{folders['swin']}"]
    code, _, err = run([*args, "--amp", "--device", "cpu", "--workers", "0", "-q"], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "a.png" / "summary.json").read_text())
    assert summary["layout"] == {"kind": "tokens", "grid": [4, 4], "prefix_tokens": 0}


def test_two_processes_give_the_one_process_outputs_of_a_hugging_face_model(folders, tmp_path, capsys):
    images = folder(tmp_path / "images", 5)
    args = ["--model", f"hf:{folders['vit']}", "--top-k", "2", "--batch-size", "2", "--workers", "0", "-q"]
    assert run(["explain", images, "-o", tmp_path / "one", *args], capsys)[0] == 0
    code, err = finish(launch(["explain", images, "-o", tmp_path / "two", *args], tmp_path, processes=2))
    assert code == 0, err
    assert tree(tmp_path / "two") == tree(tmp_path / "one")
