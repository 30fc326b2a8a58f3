"""Answers that need no model come without torch: help pages (with examples and exit codes), the version,
usage errors, a locked OUT, and `hirescam report` (`hirescam compare` too: tests/test_compare.py)."""

import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from test_cli import config, rgb, run

from hirescam_cli.cli import EXIT_CODES, cli
from hirescam_cli.lock import OutLock

TESTS = Path(__file__).parent
# Runs the CLI, then prints whether torch was ever imported (atexit runs after sys.exit).
PROBE = (
    "import atexit, sys; atexit.register(lambda: print('torch imported:', 'torch' in sys.modules)); "
    "from hirescam_cli.cli import main; sys.argv = ['hirescam', *sys.argv[1:]]; main()"
)


def cli_without_torch(*args: object) -> tuple[int, str, bool]:
    """Exit code, stderr, and whether torch was imported, of `hirescam ARGS` in a new process."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, timeout=120
    )
    return done.returncode, done.stderr, "torch imported: True" in done.stdout


@pytest.mark.parametrize(
    "args, code",
    [
        (["--help"], 0),
        (["--version"], 0),
        (["explain", "--help"], 0),
        (["explain", "in", "-o", "out", "--bogus"], 2),
        (["explain", "in", "-o", "out", "--top-k", "0"], 2),
        (["eval", "--help"], 0),
        (["compare", "--help"], 0),
        (["compare", "a", "b", "--min-agreement", "2"], 2),
    ],
)
def test_help_version_and_usage_errors_need_no_torch(args, code):
    exit_code, err, torch_loaded = cli_without_torch(*args)
    assert exit_code == code, err
    assert not torch_loaded


def test_a_locked_out_is_refused_before_torch_loads(tmp_path):
    rgb(16, 16).save(tmp_path / "x.png")
    out = tmp_path / "out"
    lock = OutLock(out)
    lock.acquire()
    try:
        code, err, torch_loaded = cli_without_torch("explain", tmp_path / "x.png", "-o", out)
    finally:
        lock.release()
    assert code == 4 and "is locked by another run" in err
    assert not torch_loaded


def test_report_needs_no_torch(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    rgb(16, 16).save(tmp_path / "x.png")
    cfg = config(tmp_path)
    code, _, err = run(["explain", tmp_path / "x.png", "-o", tmp_path / "out", "-c", cfg], capsys)
    assert code == 0, err
    code, err, torch_loaded = cli_without_torch("report", tmp_path / "out")
    assert code == 0, err
    assert not torch_loaded and (tmp_path / "out" / "report" / "index.html").is_file()


def commands() -> dict[str, click.Command]:
    return dict(cli.commands)


@pytest.mark.parametrize("name", sorted(commands()))
def test_every_help_page_has_examples_exit_codes_and_described_flags(name):
    command = commands()[name]
    page = command.get_help(click.Context(command, info_name=name))
    assert "Examples:" in page and f"hirescam {name}" in page.split("Examples:")[1]
    codes = page.split("Exit codes:")[1]
    listed = [int(code) for code in re.findall(r"\n    (\d+) ", codes)]
    assert listed[0] == 0 and set(listed) <= set(EXIT_CODES)
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help, f"{name} {param.opts[0]} has no description"


def test_the_command_list_is_not_cut(capsys):
    code, out, _ = run(["--help"], capsys)
    listing = out.split("Commands:")[1]
    assert code == 0 and "..." not in listing
    for name, command in commands().items():
        assert f"{name}  " in out and command.short_help in out


def test_eval_takes_the_model_flags_explain_takes():
    model_flags = {"--model", "--weights", "--checkpoint", "--labels", "--target-layer", "--layout", "--grid"}
    model_flags |= {"--prefix-tokens", "--top-k", "--classes", "--threshold", "--device", "--amp"}
    for name in ("explain", "eval"):
        options = {opt for param in commands()[name].params for opt in param.opts}
        assert model_flags <= options, name
