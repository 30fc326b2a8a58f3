"""Check that this checkout explains exactly as an earlier revision did: byte for byte, number for number.

    python benchmarks/identical.py OLD_REV [--keep DIR]

Exports OLD_REV (`git archive`) beside a copy of this working tree, then runs both on the same inputs,
each with its own code (`python -m hirescam_cli` with PYTHONPATH set to that tree):
  - the shipped sample images and a folder of generated JPEG photos, with the demo config, all six
    methods, top-2, --save-raw;
  - the photos with a seeded random torchvision ResNet-18 (a channels-first CNN) and, when timm is
    installed, a seeded random timm ViT (a token layer), the same flags;
  - `hirescam eval` of the sample images without and with their masks;
  - `hirescam layers` of the demo model and of the ResNet-18.
Every PNG and .npy must be byte-identical, every summary.json and results.jsonl equal (the config
fingerprint aside: it hashes the package version and config keys, which a revision may change), every
number of eval.json equal, and the layers tables equal. Fields a summary gains are not differences:
they are listed once per run ("added to summaries: ..."), while every field the old summary has must
be equal. Prints one line per check; exits 1 if any differs.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
ALL_METHODS = "hirescam,gradcam,gradcam++,xgradcam,layercam,gradcam-elementwise"
COMMON = ["--methods", ALL_METHODS, "--top-k", "2", "--save-raw", "-q", "--workers", "0"]
SMALL = "[preprocess]\nresize = 64\ncrop = 64\n"


def export(rev: str, into: Path) -> Path:
    """The tree of `rev` (a commit) or of this working tree (rev None), as plain files."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return into


def copy_worktree(into: Path) -> Path:
    """This checkout's files as they are now (tracked and untracked, not ignored)."""
    listed = (
        subprocess.run(
            ["git", "-C", ROOT, "ls-files", "-co", "--exclude-standard", "-z"],
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, into / name)
    return into


def photos(folder: Path, count: int = 10) -> Path:
    """Photo-like JPEGs of a few sizes: smooth colour fields with texture."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = [(640, 480), (480, 640), (333, 251), (1024, 683)]
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.int16)
        noise = rng.integers(-20, 20, (height, width, 3))
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(
            folder / f"p{i:02d}.jpg", quality=90
        )
    return folder


def hirescam(tree: Path, *args: object) -> str:
    """Run `python -m hirescam_cli ARGS` with the code of `tree`; returns stdout."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, "-m", "hirescam_cli", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        cwd=tree,
    )
    if done.returncode != 0:
        raise SystemExit(f"{tree.name}: hirescam {' '.join(map(str, args))} failed:\n{done.stderr}")
    return done.stdout


def json_diff(old, new, path: str = "") -> tuple[set[str], list[str]]:
    """The fields only `new` has (list items as []), and where `old`'s values differ or are gone."""
    if isinstance(old, dict) and isinstance(new, dict):
        added = {f"{path}{key}" for key in new.keys() - old.keys()}
        changed = [f"{path}{key} (gone)" for key in sorted(old.keys() - new.keys())]
        for key in sorted(old.keys() & new.keys()):
            more, differ = json_diff(old[key], new[key], f"{path}{key}.")
            added |= more
            changed += differ
        return added, changed
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        added, changed = set(), []
        for a, b in zip(old, new, strict=True):
            more, differ = json_diff(a, b, f"{path.removesuffix('.')}[].")
            added |= more
            changed += differ
        return added, changed
    return set(), [] if old == new else [path.removesuffix(".") or "(the value)"]


def compare_outs(old: Path, new: Path, added: set[str] | None = None) -> list[str]:
    """What differs between two OUT folders: pictures and raw maps byte for byte, summaries and ledger;
    fields the new summaries gain go to `added`."""
    problems = []

    def files(root: Path) -> set[str]:
        skip = {"run.json"}
        return {
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.is_file() and p.name not in skip and ".tmp" not in p.parts and "report" not in p.parts
        }

    a, b = files(old), files(new)
    problems += [f"only in old: {name}" for name in sorted(a - b)]
    problems += [f"only in new: {name}" for name in sorted(b - a)]
    for name in sorted(a & b):
        left, right = (old / name).read_bytes(), (new / name).read_bytes()
        if name.endswith("summary.json"):
            left, right = json.loads(left), json.loads(right)
            left.pop("fingerprint", None)
            right.pop("fingerprint", None)
            more, differ = json_diff(left, right)
            if added is not None:
                added |= more
            problems += [f"differs: {name}: {', '.join(differ[:5])}"] if differ else []
        elif left != right:
            problems.append(f"differs: {name}")
    return problems


def numbers(value) -> list:
    """Every number of a JSON value, in order (keys sorted), with its path."""
    if isinstance(value, dict):
        return [(f"{k}.{p}", v) for k in sorted(value) for p, v in numbers(value[k])]
    if isinstance(value, list):
        return [(f"{i}.{p}", v) for i, item in enumerate(value) for p, v in numbers(item)]
    return [("", value)] if isinstance(value, int | float) and not isinstance(value, bool) else []


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("old_rev")
    parser.add_argument("--keep", type=Path, help="work in this (new) folder and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        work = args.keep or Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        trees = {"old": export(args.old_rev, work / "old"), "new": copy_worktree(work / "new")}
        jpegs = photos(work / "photos")
        small = work / "small.toml"
        small.write_text(SMALL)
        runs = {
            "demo, sample images": [ROOT / "sample_images", *COMMON],
            "demo, JPEG photos": [jpegs, *COMMON],
            "resnet18 (random, seeded), photos": [
                jpegs,
                "-c",
                small,
                "--model",
                "resnet18",
                "--weights",
                "none",
                *COMMON,
            ],
        }
        try:
            import timm  # noqa: F401

            runs["timm test_vit (random, seeded), photos"] = [
                jpegs,
                "-c",
                small,
                "--model",
                "timm:test_vit",
                "--weights",
                "none",
                *COMMON,
            ]
        except ImportError:
            print("timm is not installed: no token-layer run")
        failed = False
        for number, (name, run) in enumerate(runs.items()):
            outs = {side: work / f"{side}-out{number}" for side in trees}
            for side, tree in trees.items():
                hirescam(tree, "explain", run[0], "-o", outs[side], *run[1:])
            added: set[str] = set()
            problems = compare_outs(outs["old"], outs["new"], added)
            count = len([p for p in outs["old"].rglob("*") if p.suffix in (".png", ".npy")])
            print(f"{name:44s} {count:4d} PNG/.npy files  {'identical' if not problems else 'DIFFERENT'}")
            if added:
                print(f"    added to summaries: {', '.join(sorted(added))}")
            for problem in problems[:10]:
                print(f"    {problem}")
            failed |= bool(problems)
        for name, flags in (
            ("eval, sample images", []),
            ("eval with masks, sample images", ["--masks", ROOT / "sample_masks"]),
        ):
            reports = {}
            for side, tree in trees.items():
                out = work / f"{side}-eval{len(flags)}"
                hirescam(tree, "eval", ROOT / "sample_images", "-o", out, "--workers", "0", *flags)
                reports[side] = numbers(json.loads((out / "eval.json").read_text()))
            same = reports["old"] == reports["new"]
            print(
                f"{name:44s} {len(reports['old']):4d} numbers         {'identical' if same else 'DIFFERENT'}"
            )
            failed |= not same
        for name, flags in (("layers, demo", []), ("layers, resnet18", ["--model", "resnet18"])):
            tables = {side: hirescam(tree, "layers", *flags) for side, tree in trees.items()}
            same = tables["old"] == tables["new"]
            lines = len(tables["old"].splitlines())
            print(f"{name:44s} {lines:4d} lines           {'identical' if same else 'DIFFERENT'}")
            failed |= not same
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
