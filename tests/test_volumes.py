"""Volumes end to end: NIfTI and DICOM in, maps on the input's own voxel grid and world geometry out."""

import copy
import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from determinism import assert_close_scaled, noise, seeded
from report_runs import report_data
from test_cli import run
from tiny_models import CELL, tiny_net3d
from volume_sets import oblique_affine, write_nifti, write_series

from hirescam_cli import METHODS, Explainer
from hirescam_cli.config import ConfigError, load
from hirescam_cli.modalities.volume_files import VolumeError, read_volume
from hirescam_cli.modalities.volume_settings import VolumePreprocess
from hirescam_cli.modalities.volumes import prepare

TESTS = Path(__file__).parent
SHAPE = (16, 12, 8)  # input voxels; resized by 1/2 to the model's 8 x 6 x 4, a 4 x 3 x 2 grid
VOLUME_CONFIG = """
[input]
kind = "volumes"
[model]
factory = "tiny_models:{factory}"
[preprocess]
resize = [8, 6, 4]
window = [-1000, 400]
{preprocess}
[explain]
batch_size = 2
workers = 0
{explain}
"""


@pytest.fixture(autouse=True)
def importable_tiny_models(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def volume_config(
    tmp_path: Path, factory: str = "tiny_net3d", preprocess: str = "", explain: str = ""
) -> Path:
    path = tmp_path / "volumes.toml"
    path.write_text(VOLUME_CONFIG.format(factory=factory, preprocess=preprocess, explain=explain))
    return path


def hounsfield(shape=SHAPE, seed: int = 0) -> np.ndarray:
    """Integer HU values of a noisy body: air outside, tissue and bright spots inside."""
    rng = np.random.default_rng(seed)
    return np.rint(rng.normal(0, 300, shape)).clip(-1000, 1500)


def records(out: Path, folder: Path) -> dict[str, dict]:
    """The ledger's records by the input's path relative to `folder`."""
    lines = (out / "results.jsonl").read_text().splitlines()
    return {Path(r["input"]).relative_to(folder).as_posix(): r for r in map(json.loads, lines)}


def summary(out: Path, key: str) -> dict:
    return json.loads((out / key / "summary.json").read_text())


# -- the engine in 3-D ------------------------------------------------------------------------------


def test_raw_3d_maps_equal_a_hand_computation_for_all_six_methods():
    model = tiny_net3d()
    x = noise(3, 1, 8, 6, 4, seed=4)
    with Explainer(model, "3") as explainer:
        result = explainer(x, methods=tuple(METHODS), classes=[0, 2])
    with torch.enable_grad():
        a = model[:4](x).detach().double().requires_grad_()  # (B, K, 4, 4, 4)
        logits = copy.deepcopy(model[4:]).double()(a)
        g = torch.stack([torch.autograd.grad(logits[:, c].sum(), a, retain_graph=True)[0] for c in (0, 2)], 1)
    a, g = a.detach()[:, None], g
    mean_g = g.mean((-3, -2, -1), keepdim=True)
    positions = (-3, -2, -1)
    sum_a = a.sum(positions, keepdim=True)
    xgrad = (g * a).sum(positions, keepdim=True) / torch.where(sum_a != 0, sum_a, 1.0)
    g2 = g * g
    denominator = 2 * g2 + sum_a * g2 * g
    alpha = torch.where(denominator != 0, g2 / torch.where(denominator != 0, denominator, 1.0), 0.0)
    expected = {
        "hirescam": (g * a).sum(2),
        "gradcam": (mean_g * a).sum(2),
        "gradcam-elementwise": (g * a).clamp_min(0).sum(2),
        "xgradcam": (xgrad * a).sum(2),
        "gradcam++": ((alpha * g.clamp_min(0)).sum(positions, keepdim=True) * a).sum(2),
        "layercam": (g.clamp_min(0) * a).sum(2),
    }
    for name, maps in expected.items():
        assert result.maps[name].shape == (3, 2, 4, 3, 2)
        assert_close_scaled(result.maps[name].double(), maps, rel=1e-6)


# -- reading and geometry ---------------------------------------------------------------------------


def test_a_dicom_series_has_the_world_geometry_of_the_same_nifti(tmp_path):
    affine = oblique_affine(zooms=(0.8, 1.2, 2.5), degrees=25.0, flip_x=False, origin=(-40.0, 12.5, 7.0))
    data = 2 * np.rint(hounsfield((10, 8, 6), seed=1) / 2)  # what a slope of 2 can store
    nifti = write_nifti(tmp_path / "a.nii.gz", data, affine)
    series = write_series(tmp_path / "series", data, affine, slope=2.0, intercept=-1024.0)
    from_nifti = read_volume(nifti.read_bytes(), 10**6)
    files = [
        (p.name, p.read_bytes()) for p in sorted(series.iterdir())[::-1]
    ]  # any order: sorted by position
    from_dicom = read_volume(files, 10**6)
    np.testing.assert_allclose(from_dicom.affine, from_nifti.affine, atol=1e-6)
    np.testing.assert_array_equal(from_dicom.data, from_nifti.data)  # HU, through RescaleSlope / Intercept
    assert from_dicom.facts["slices"] == 6 and from_dicom.header["sform_code"] == 1
    settings = VolumePreprocess(spacing=(1.0, 1.0, 2.0), crop=(9, 9, 6), window=(-1000.0, 400.0))
    (x_nifti, to_nifti), (x_dicom, to_dicom) = (
        prepare(torch.from_numpy(v.data), v.affine, settings) for v in (from_nifti, from_dicom)
    )
    assert torch.equal(x_nifti, x_dicom)
    np.testing.assert_allclose(from_dicom.affine @ to_dicom, from_nifti.affine @ to_nifti, atol=1e-6)


def test_the_geometry_maps_model_voxels_onto_the_world_through_every_step():
    affine = oblique_affine()
    data = hounsfield()
    settings = VolumePreprocess(orientation="RAS", spacing=(2.0, 2.0, 2.0), resize=(6, 8, 10), crop=(8, 8, 8))
    x, to_input = prepare(torch.from_numpy(data.astype(np.float32)), affine, settings)
    assert x.shape == (1, 8, 8, 8)
    axes = nib.orientations.aff2axcodes(affine @ to_input)
    assert axes == ("R", "A", "S")  # the model's axes point right, anterior, superior
    # A volume that is a linear ramp in the world stays the same ramp through every step, in the model's
    # voxels: its value at model voxel u is the world position of u, wherever the voxel lies inside.
    ramp = np.einsum("ij,jklm->iklm", affine[:3, :3], np.indices(SHAPE)) + affine[:3, 3, None, None, None]
    world_x = ramp[0].astype(np.float32)
    plain = VolumePreprocess(orientation="RAS", spacing=(2.0, 2.0, 2.0), resize=(6, 8, 10), crop=(4, 8, 10))
    y, to_input = prepare(torch.from_numpy(world_x), affine, plain)
    u = np.indices((4, 8, 10)).reshape(3, -1)
    expected = (affine @ to_input @ np.vstack([u, np.ones(u.shape[1])]))[0]
    inner = (u[2] > 0) & (u[2] < 9) & (u[1] > 0) & (u[1] < 7)  # away from the edges the resize clamps at
    np.testing.assert_allclose(y[0].reshape(-1).numpy()[inner], expected[inner], atol=1e-3)


def test_two_series_in_one_folder_are_two_inputs_keyed_by_series(tmp_path, capsys):
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    write_series(tmp_path / "in" / "both", hounsfield(seed=1), affine, series="11", prefix="a")
    write_series(tmp_path / "in" / "both", hounsfield(seed=2), affine, series="12", prefix="b")
    write_series(tmp_path / "in" / "one", hounsfield(seed=3), affine, series="13")
    (tmp_path / "in" / "one" / "README").write_text("not a slice")
    out = tmp_path / "out"
    code, _, err = run(["explain", tmp_path / "in", "-o", out, "-c", volume_config(tmp_path), "-q"], capsys)
    assert code == 0, err
    keys = sorted(records(out, tmp_path / "in"))
    uid = "1.2.826.0.1.3680043.8.498."
    assert keys == [f"both/{uid}11", f"both/{uid}12", "one"]
    assert summary(out, "one")["source"] == {
        "format": "dicom",
        "series_uid": f"{uid}13",
        "modality": "CT",
        "slices": 8,
    }


def test_a_series_folder_given_itself_is_keyed_by_its_name(tmp_path, capsys):
    series = write_series(tmp_path / "ct", hounsfield(), np.diag([1.0, 1.0, 2.0, 1.0]))
    out = tmp_path / "out"
    assert run(["explain", series, "-o", out, "-c", volume_config(tmp_path), "-q"], capsys)[0] == 0
    assert (out / "ct" / "summary.json").exists()


def test_uneven_slices_are_resampled_when_asked(tmp_path):
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    data = np.repeat(np.arange(8, dtype=np.float64)[None, None] * 100, 4, 0).repeat(3, 1)  # HU = 100 k
    series = write_series(tmp_path / "s", data, affine, skip=(3,))
    files = [(p.name, p.read_bytes()) for p in sorted(series.iterdir())]
    with pytest.raises(VolumeError, match=r"1 missing slice: a gap of 4\.00 mm between slice slice002\.dcm"):
        read_volume(files, 10**6)
    volume = read_volume(files, 10**6, uneven="resample")
    assert volume.data.shape == (4, 3, 8) and volume.facts["resampled_slices"] == 8
    np.testing.assert_allclose(volume.affine, affine, atol=1e-9)
    np.testing.assert_allclose(volume.data[0, 0], np.arange(8) * 100, atol=1e-3)  # the gap interpolated


# -- outputs ----------------------------------------------------------------------------------------


def test_a_planted_cell_lands_on_its_voxels_and_its_world_position(tmp_path, capsys):
    """cell_net3d reads only the grid cell CELL. Through a flip of the first axis (to RAS) and a resize by
    1/2, that cell is, by hand, input voxels i in 12 - 4 c0 .. 15 - 4 c0, j in 4 c1 .. 4 c1 + 3 and
    k in 4 c2 .. 4 c2 + 3: HiResCAM's NIfTI map is 1 there and 0 everywhere else, and its peak is the
    voxel nearest that block's centre, at the planted lesion's world position, on an oblique,
    anisotropic, flipped affine."""
    affine = oblique_affine(zooms=(1.0, 1.5, 3.0), degrees=20.0, flip_x=True)
    c0, c1, c2 = CELL
    block = (slice(12 - 4 * c0, 16 - 4 * c0), slice(4 * c1, 4 * c1 + 4), slice(4 * c2, 4 * c2 + 4))
    centre = np.array([13.5 - 4 * c0, 4 * c1 + 1.5, 4 * c2 + 1.5])
    lesion_world = affine[:3, :3] @ centre + affine[:3, 3]
    data = hounsfield()
    data[block] = 1200  # the lesion
    scan = write_nifti(tmp_path / "in" / "scan.nii.gz", data, affine)
    out = tmp_path / "out"
    code, _, err = run(
        ["explain", scan, "-o", out, "-c", volume_config(tmp_path, "cell_net3d"), "-q"], capsys
    )
    assert code == 0, err
    found = summary(out, "scan.nii.gz")
    maps = found["targets"][0]["maps"]["hirescam"]
    written = nib.load(out / maps["nifti"])
    assert written.shape == SHAPE and np.array_equal(written.affine, nib.load(scan).affine)
    assert int(written.header["sform_code"]) == 1 and int(written.header["qform_code"]) == 1
    values = np.asarray(written.dataobj)
    assert values.dtype == np.float32 and (values[block] == 1).all()
    outside = np.ones(SHAPE, bool)
    outside[block] = False
    assert (values[outside] == 0).all()
    assert maps["peak"] == [int(v) for v in np.floor(centre + 0.5)]
    voxel = np.linalg.norm(affine[:3, :3], axis=0)
    assert np.linalg.norm(np.array(maps["peak_world"]) - lesion_world) <= 0.5 * np.linalg.norm(voxel) + 1e-4
    assert found["affine"] == [[pytest.approx(v, abs=1e-6) for v in line] for line in affine.tolist()]
    assert found["shape"] == list(SHAPE) and found["orientation"] == "LAS"
    assert found["spacing"] == [pytest.approx(v) for v in (1.0, 1.5, 3.0)]
    target = found["targets"][0]
    assert target["slice_axis"] == 2 and target["slice_shares"][c2] == 1.0 and target["top_slices"][0] == c2
    assert target["guarantee"] and abs(target["completeness_gap"]) < 1e-4
    gradcam = np.asarray(nib.load(out / found["targets"][0]["maps"]["gradcam"]["nifti"]).dataobj)
    assert (gradcam[outside] > 0).any()  # Grad-CAM puts mass where the model provably does not read


def test_raw_maps_come_on_their_grid_with_the_grids_affine(tmp_path, capsys):
    affine = oblique_affine()
    scan = write_nifti(tmp_path / "in" / "scan.nii", hounsfield(), affine)
    out = tmp_path / "out"
    flags = ["-c", volume_config(tmp_path), "--save-raw", "-q"]
    assert run(["explain", scan, "-o", out, *flags], capsys)[0] == 0
    maps = summary(out, "scan.nii")["targets"][0]["maps"]["hirescam"]
    grid = nib.load(out / maps["grid_nifti"])
    raw = np.load(out / maps["raw"])
    assert grid.shape == raw.shape == (4, 3, 2)
    np.testing.assert_array_equal(np.asarray(grid.dataobj), raw)
    # cell (0, 0, 0) is model voxels 0..1 on each axis: its centre is model voxel 0.5, input voxel 15 - 1.5
    # on the flipped first axis and 1.5 on the others
    np.testing.assert_allclose(
        grid.affine[:3, 3], affine[:3, :3] @ [13.5, 1.5, 1.5] + affine[:3, 3], atol=1e-4
    )
    assert gzip.decompress((out / maps["nifti"]).read_bytes())[:4] == (348).to_bytes(4, "little")


def test_bad_volumes_get_one_line_each_and_the_rest_is_done(tmp_path, capsys):
    folder, affine = tmp_path / "in", np.diag([1.0, 1.0, 2.0, 1.0])
    write_nifti(folder / "good.nii.gz", hounsfield(), affine)
    write_series(folder / "good_series", hounsfield(seed=1), affine, series="20")
    write_nifti(folder / "four_d.nii.gz", np.zeros((*SHAPE, 3)), affine)
    header = bytearray(nib.Nifti1Image(np.zeros(SHAPE, np.int16), affine).to_bytes())
    header[252:256] = np.array([0, 1], "<i2").tobytes()  # qform_code 0, sform_code 1
    header[296:312] = bytes(16)  # srow_y = 0: the sform maps every voxel to one plane
    (folder / "singular.nii.gz").write_bytes(gzip.compress(bytes(header)))
    write_nifti(folder / "huge.nii.gz", np.zeros((24, 24, 24)), affine)
    whole = write_nifti(folder / "cut.nii.gz", hounsfield(), affine).read_bytes()
    (folder / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])
    plain = write_nifti(folder / "short.nii", hounsfield(), affine).read_bytes()
    (folder / "short.nii").write_bytes(plain[:600])
    write_series(folder / "gap", hounsfield(seed=2), affine, series="21", skip=(4,))
    write_series(folder / "uneven", hounsfield(seed=3), affine, series="22", shift={5: 0.7})
    write_series(folder / "jpegls", hounsfield(seed=4), affine, series="23", syntax="1.2.840.10008.1.2.4.80")
    cut = write_series(folder / "cut_series", hounsfield(seed=5), affine, series="24") / "slice003.dcm"
    cut.write_bytes(cut.read_bytes()[:-100])
    (folder / "garbage.dcm").write_bytes(b"not dicom at all")
    (folder / "notes.txt").write_text("not a volume: never an input")
    out = tmp_path / "out"
    flags = ["-c", volume_config(tmp_path, preprocess="max_voxels = 10000"), "-q"]
    code, _, err = run(["explain", folder, "-o", out, *flags], capsys)
    assert code == 1 and "Traceback" not in err
    found = {key: r.get("error") for key, r in records(out, folder).items()}
    expected = {
        "good.nii.gz": None,
        "good_series": None,
        "four_d.nii.gz": "a 4-D NIfTI of shape [16, 12, 8, 3] (3 volumes",
        "singular.nii.gz": "non-invertible affine",
        "huge.nii.gz": "13824 voxels exceeds the limit of 10000 (preprocess.max_voxels)",
        "cut.nii.gz": "truncated file",
        "short.nii": "truncated or corrupt voxel data",
        "gap": "1 missing slice: a gap of 4.00 mm between slice slice003.dcm",
        "uneven": "uneven slice spacing: 2.70 mm between slice slice004.dcm",
        "jpegls": "compressed pixel data (JPEG-LS Lossless Image Compression) and no decoder for it",
        "cut_series": "slice slice003.dcm: ",
        "garbage.dcm": "not a NIfTI (.nii, .nii.gz) or DICOM file",
    }
    assert set(found) == set(expected)
    for key, error in expected.items():
        assert (found[key] is None) if error is None else (error in found[key]), (key, found[key])
        assert error is None or "\n" not in found[key]
    assert "uneven_slices" in found["uneven"]  # the error names the fix


@pytest.mark.parametrize(
    "given", ["volumes", "images"], ids=["picture-model-given-volumes", "volume-model-given-pictures"]
)
def test_a_model_of_another_rank_than_the_inputs_is_a_usage_error(tmp_path, capsys, given):
    folder = tmp_path / "in"
    if given == "images":
        from PIL import Image

        folder.mkdir()
        Image.new("RGB", (16, 16)).save(folder / "a.png")
        config = tmp_path / "c.toml"
        config.write_text('[model]\nfactory = "tiny_models:tiny_net3d"\n[preprocess]\nresize = [16, 16]\n')
    else:
        write_nifti(folder / "a.nii.gz", hounsfield(), np.eye(4))
        config = volume_config(tmp_path, "tiny_net")
    code, _, err = run(["explain", folder, "-o", tmp_path / "out", "-c", config], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "-D network" in err and "[input] kind" in err and not (tmp_path / "out").exists()


def test_volume_config_keys_are_checked_by_the_kind(tmp_path):
    def config(text: str, kind: str = "volumes"):
        path = tmp_path / "c.toml"
        path.write_text(f'[input]\nkind = "{kind}"\n[model]\nfactory = "tiny_models:tiny_net3d"\n' + text)
        return load(path)

    assert config("[preprocess]\nresize = 8\nspacing = 1.5\n").preprocess.spacing == (1.5, 1.5, 1.5)
    for text, kind, message in [
        ("[preprocess]\nspacing = 2\n", "images", "unknown key preprocess.spacing"),
        ("[preprocess]\nmax_pixels = 4\n", "volumes", "unknown key preprocess.max_pixels"),
        ("[preprocess]\nwindow = [400, -1000]\n", "volumes", "preprocess.window"),
        ("[preprocess]\norientation = 'RAR'\n", "volumes", "preprocess.orientation"),
        ("[preprocess]\nuneven_slices = 'guess'\n", "volumes", "preprocess.uneven_slices"),
        ("[render]\nwindow = [1]\n", "volumes", "render.window"),
        ("", "scans", "input.kind = 'scans' is not allowed"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config(text, kind)
    (tmp_path / "t.toml").write_text('[model]\narch = "resnet18"\n[model.kwargs]\nx = 1\n')
    with pytest.raises(ConfigError, match=r"\[model.kwargs\]"):
        load(tmp_path / "t.toml")


def test_volumes_need_the_model_input_size(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text('[input]\nkind = "volumes"\n[model]\nfactory = "tiny_models:tiny_net3d"\n')
    write_nifti(tmp_path / "in" / "a.nii.gz", hounsfield(), np.eye(4))
    code, _, err = run(["explain", tmp_path / "in", "-o", tmp_path / "out", "-c", path], capsys)
    assert code == 2 and "preprocess.resize or preprocess.crop" in err


def test_monai_densenet_explains_a_volume_with_kwargs(tmp_path, capsys):
    pytest.importorskip("monai")
    config = tmp_path / "m.toml"
    config.write_text(
        '[input]\nkind = "volumes"\n[model]\narch = "monai:DenseNet121"\nweights = "none"\n'
        "[model.kwargs]\nspatial_dims = 3\nin_channels = 1\nout_channels = 2\n"
        "[preprocess]\nresize = [32, 32, 32]\n[explain]\nworkers = 0\n"
    )
    write_nifti(tmp_path / "in" / "a.nii.gz", hounsfield(), oblique_affine())
    out = tmp_path / "out"
    with seeded():
        code, _, err = run(["explain", tmp_path / "in", "-o", out, "-c", config, "-q"], capsys)
    assert code == 0, err
    found = summary(out, "a.nii.gz")
    assert found["model"] == "monai:DenseNet121 (random weights)" and found["random_weights"]
    assert found["layout"]["kind"] == "ncdhw"
    assert nib.load(out / found["targets"][0]["maps"]["hirescam"]["nifti"]).shape == SHAPE


# -- resume and torchrun ----------------------------------------------------------------------------


def volume_folder(root: Path, count: int) -> Path:
    for i in range(count):
        write_nifti(root / f"v{i:02d}.nii.gz", hounsfield(seed=10 + i), oblique_affine())
    return root


def test_volume_pictures_in_another_format_sit_beside_their_nifti_maps_and_resume(tmp_path, capsys):
    volumes = volume_folder(tmp_path / "in", 2)
    out = tmp_path / "out"
    command = ["explain", volumes, "-o", out, "-c", volume_config(tmp_path), "--format", "webp"]
    assert run(command, capsys)[0] == 0
    for key in ("v00.nii.gz", "v01.nii.gz"):
        for entry in summary(out, key)["targets"][0]["maps"].values():
            assert "png" not in entry and (out / entry["webp"]).read_bytes()[8:12] == b"WEBP"
            assert entry["nifti"].endswith(".nii.gz") and (out / entry["nifti"]).is_file()
    code, _, err = run(command, capsys)  # the folders hold what their summaries list: nothing is redone
    assert code == 0 and "0 explained, 2 skipped, 0 failed" in err


def test_kill_9_then_rerun_gives_the_uninterrupted_volumes(tmp_path, capsys):
    from test_faults import start, tree, wait_for_summaries

    volumes = volume_folder(tmp_path / "in", 10)
    slow = volume_config(tmp_path, "slow_net3d")
    reference = tmp_path / "reference"
    assert run(["explain", volumes, "-o", reference, "-c", slow, "-q"], capsys)[0] == 0
    out = tmp_path / "out"
    process = start(["explain", volumes, "-o", out, "-c", slow, "-q"], tmp_path)
    wait_for_summaries(out, 3, process)
    process.kill()
    process.wait()
    done_before = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}
    assert 3 <= len(done_before) < 10
    assert run(["explain", volumes, "-o", out, "-c", slow, "-q"], capsys)[0] == 0
    ledgerless = lambda root: {k: v for k, v in tree(root).items() if k != "results.jsonl"}  # noqa: E731
    assert ledgerless(out) == ledgerless(reference) and any(k.endswith(".nii.gz") for k in ledgerless(out))
    assert all(p.stat().st_mtime_ns == t for p, t in done_before.items())  # not redone


def test_two_processes_give_the_one_process_volumes(tmp_path, capsys):
    from test_faults import tree
    from test_scale import finish, launch

    volumes = volume_folder(tmp_path / "in", 5)  # 3 batches of 2: ranks take batches 0, 2 and 1
    cfg = volume_config(tmp_path)
    assert run(["explain", volumes, "-o", tmp_path / "one", "-c", cfg, "-q"], capsys)[0] == 0
    code, err = finish(launch(["explain", volumes, "-o", tmp_path / "two", "-c", cfg], tmp_path, processes=2))
    assert code == 0, err
    assert tree(tmp_path / "two") == tree(tmp_path / "one")  # summaries, NIfTI maps, PNGs, results.jsonl
    assert err.count("5 explained, 0 skipped, 0 failed") == 1


def test_eval_scores_fidelity_on_volumes(tmp_path, capsys):
    volumes = volume_folder(tmp_path / "in", 3)
    out = tmp_path / "eval"
    code, stdout, err = run(["eval", volumes, "-c", volume_config(tmp_path, "cell_net3d"), "-o", out], capsys)
    assert code == 0, err
    report = json.loads((out / "eval.json").read_text())
    assert report["occlusion"]["grid"] == [4, 3, 2] and report["occlusion"]["positions"] == 24
    assert report["methods"]["hirescam"]["unused_mass"]["mean"] == 0.0  # it reads one cell: no mass elsewhere
    assert report["methods"]["gradcam"]["unused_mass"]["mean"] > 0.5
    assert "rank correlation with occlusion" in stdout


def test_the_report_shows_volume_cards_and_links_their_nifti_maps(tmp_path, capsys):
    scan = write_nifti(tmp_path / "in" / "scan.nii.gz", hounsfield(), oblique_affine(zooms=(1.0, 1.5, 3.0)))
    out = tmp_path / "out"
    assert run(["explain", scan, "-o", out, "-c", volume_config(tmp_path), "--report", "-q"], capsys)[0] == 0
    found = summary(out, "scan.nii.gz")
    card = report_data(out)["images"][0]
    times = " \N{MULTIPLICATION SIGN} "
    assert card["d"] == f"16{times}12{times}8 voxels of 1{times}1.5{times}3 mm, {found['orientation']}"
    assert card["k"] == "volume" and "o" not in card  # no picture of its own: its maps show it
    (target,) = card["t"]
    assert target["l"] == found["targets"][0]["label"] and target["p"] == found["targets"][0]["probability"]
    assert target["r"] == found["targets"][0]["agreement"]["pearson"]
    for cell, method in zip(target["m"], ("hirescam", "gradcam"), strict=True):
        maps = found["targets"][0]["maps"][method]
        assert cell[1] == "../" + maps["png"] and cell[2] == "../" + maps["nifti"]
        assert (out / "report" / "thumbs" / cell[0]).is_file()
    html = (out / "report" / "index.html").read_text()
    assert f'href="../{found["targets"][0]["maps"]["hirescam"]["nifti"]}"' in html and card["d"] in html


def test_maps_registered_on_the_voxels_are_nan_beyond_the_model_input_and_padded_per_volume(tmp_path):
    """to_original (eval's localisation): a 16 x 12 x 8 scan centre-cropped to the model's 8 x 6 x 4 is
    covered on [4:12, 3:9, 2:6] only (NaN around it), each voxel taking its 2^3-voxel cell's value; a
    6 x 6 x 4 scan padded by one voxel before axis 0 is covered whole, within the batch's padded extent."""
    from hirescam_cli.modalities.volumes import Volumes

    config = volume_config(tmp_path, preprocess="crop = [8, 6, 4]")
    config.write_text(config.read_text().replace("resize = [8, 6, 4]\n", ""))
    modality = Volumes.from_config(load(config), None, pictures=False)
    views = []
    for name, shape in (("big", SHAPE), ("small", (6, 6, 4))):
        path = write_nifti(tmp_path / f"{name}.nii.gz", hounsfield(shape), np.eye(4))
        views.append(modality.load(path.read_bytes())[1])
    maps = noise(3, 4, 3, 2, seed=7)
    registered, voxels = modality.to_original(maps, modality.collate(views), [0, 1, 1])
    assert registered.shape == voxels.shape == (3, *SHAPE)
    big = torch.full(SHAPE, torch.nan)
    big[4:12, 3:9, 2:6] = maps[0].repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert torch.equal(registered[0].isnan(), big.isnan())
    assert torch.equal(registered[0].nan_to_num(), big.nan_to_num())
    assert voxels[0].all()
    cells = torch.tensor([0, 1, 1, 2, 2, 3]), torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 0, 1, 1])
    for pair in (1, 2):
        small = maps[pair][cells[0][:, None, None], cells[1][None, :, None], cells[2][None, None, :]]
        assert torch.equal(registered[pair, :6, :6, :4], small)
        assert registered[pair, 6:].isnan().all() and registered[pair, :, 6:].isnan().all()
        assert voxels[pair, :6, :6, :4].all() and voxels[pair].sum() == 6 * 6 * 4


def test_eval_with_masks_localises_the_planted_cell_on_volumes(tmp_path, capsys):
    """cell_net3d reads one cell; a NIfTI mask of that cell's voxels (on the scan's oblique flipped grid) is
    found for `case.nii.gz` in MASKS/case/, the maps are registered onto the scan's voxels through its
    geometry, and HiResCAM's mass lies all in it. A mask of another grid is a problem line, the rest still
    scored."""
    affine = oblique_affine(zooms=(1.0, 1.5, 3.0), degrees=20.0, flip_x=True)
    c0, c1, c2 = CELL
    block = (slice(12 - 4 * c0, 16 - 4 * c0), slice(4 * c1, 4 * c1 + 4), slice(4 * c2, 4 * c2 + 4))
    mask = np.zeros(SHAPE, np.uint8)
    mask[block] = 1
    for name in ("case", "other"):
        write_nifti(tmp_path / "in" / f"{name}.nii.gz", hounsfield(seed=len(name)), affine)
        write_nifti(tmp_path / "masks" / name / "class_0.nii.gz", mask, affine, dtype=np.uint8)
    write_nifti(tmp_path / "masks" / "other" / "class_0.nii.gz", mask[:-1], affine, dtype=np.uint8)
    labels = tmp_path / "labels.txt"
    labels.write_text("class_0\nclass_1\nclass_2\n")
    config = volume_config(tmp_path, "cell_net3d")
    config.write_text(config.read_text().replace("[model]\n", f'[model]\nlabels = "{labels}"\n'))
    out = tmp_path / "eval"
    masks = ["--masks", tmp_path / "masks"]
    code, stdout, err = run(["eval", tmp_path / "in", *masks, "-c", config, "-o", out], capsys)
    assert code == 0, err
    report = json.loads((out / "eval.json").read_text())
    assert report["masks"] and report["pairs"] == 1
    # HiResCAM's map is that one cell; registered onto the scan's voxels as the NIfTI maps are (each voxel
    # takes its cell's value), it covers the mask's voxels exactly: every localisation metric is perfect
    hires = report["methods"]["hirescam"]
    for metric in ("pointing_game", "relevance_mass_accuracy", "relevance_rank_accuracy", "roc_auc"):
        assert hires[metric]["mean"] == pytest.approx(1.0, rel=1e-6), metric
    gradcam = report["methods"]["gradcam"]["relevance_mass_accuracy"]["mean"]
    assert gradcam < hires["relevance_mass_accuracy"]["mean"]
    assert "other/class_0.nii.gz: mask is 15x12x8 voxels, the volume 16x12x8" in err
    assert "Localisation" in stdout
