"""The package's data files (demo weights, report templates and scripts) are all shipped in a wheel."""

import tomllib
from fnmatch import fnmatchcase
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "hirescam_cli"


def matches(relative: Path, pattern: str) -> bool:
    """A setuptools package-data glob: each '*' stays within one folder."""
    parts = pattern.split("/")
    return len(parts) == len(relative.parts) and all(map(fnmatchcase, relative.parts, parts))


def test_every_data_file_of_the_package_is_listed_in_package_data():
    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["hirescam_cli"]
    data = [
        path.relative_to(PACKAGE)
        for path in PACKAGE.rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts
    ]
    assert data, "no data files found"
    assert [str(p) for p in data if not any(matches(p, pattern) for pattern in patterns)] == []
