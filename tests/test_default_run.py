"""The README's first command, and the shipped configs, as a new user meets them."""

import json
from pathlib import Path

import pytest
from PIL import Image
from test_cli import run

from hirescam_cli.config import DEFAULT_CONFIG, load

ROOT = Path(__file__).parent.parent


def test_readme_starts_with_the_two_commands():
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("python3.11")]
    assert lines[0].endswith("-e . && .venv/bin/hirescam explain sample_images -o out")
    assert lines[1].endswith("&& .venv/bin/python -m pytest -q")


def test_main_job_on_the_sample_images_with_the_default(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(["explain", ROOT / "sample_images", "-o", out], capsys)
    assert code == 0, err
    truth = json.loads((ROOT / "sample_masks" / "labels.json").read_text())
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == len(truth) >= 16 and {r["status"] for r in records} == {"ok"}
    right = 0
    for record in records:
        summary = json.loads((out / record["summary"]).read_text())
        found = [t["label"] for t in summary["targets"]]
        right += sorted(found) == sorted(truth[Path(summary["input"]).name])
        for target in summary["targets"]:
            assert target["guarantee"] is True
            assert abs(target["completeness_gap"]) < 1e-3 * max(1.0, abs(target["logit"]))
            for entry in target["maps"].values():
                with Image.open(out / entry["png"]) as png:
                    assert png.size == (summary["width"], summary["height"])
    assert right >= 0.9 * len(records), f"{right}/{len(records)} images with exactly the true labels"
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["config_file"] == str(DEFAULT_CONFIG)


def test_configs_folder_holds_the_default():
    assert (ROOT / "configs" / "demo.toml").resolve() == DEFAULT_CONFIG.resolve()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_configs_are_valid(path):
    config = load(path)
    assert config.model.arch or config.model.factory
