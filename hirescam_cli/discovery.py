"""Finding the inputs: arguments, folders, glob patterns and path lists -> a sorted catalogue of InputItems.

The catalogue lives in a temporary SQLite file, which sorts and de-duplicates on disk: memory stays flat
however many inputs there are (a million paths are tens of MB of file, not a gigabyte of Python lists).
Walks stream their folders' entries straight into it. On Linux the process that builds it holds an flock
on it while it lives, so a run killed before it could remove its file (SIGKILL, the OOM killer) leaves one
that the next run removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import functools
import glob
import hashlib
import itertools
import logging
import os
import sqlite3
import stat
import sys
import tempfile
import threading
import time
import unicodedata
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import modalities
from .errors import UsageError

logger = logging.getLogger(__name__)

_CHUNK = 10_000  # rows per SQLite round trip
_PREFIX, _SUFFIX = "hirescam-inputs-", ".sqlite"  # a catalogue file's name in the temporary folder
_HELD = sys.platform.startswith("linux")  # there flock and SQLite's own (fcntl) locks never interact
_ABANDONED_AFTER = 60  # seconds: an older catalogue file that no process holds was left by a killed run


class InputError(UsageError):
    """A usage problem with the INPUTS arguments (nothing matched, path missing); the message is one line."""


@dataclass(frozen=True)
class InputItem:
    """One input to explain: the file to read (or, for an input of several files, the path that names them
    and its `members`) and the unique relative key that names its outputs."""

    path: Path
    key: str
    members: tuple[Path, ...] | None = None  # the files of an input made of several (a DICOM series)

    @property
    def shown(self) -> str:
        """The path as printable UTF-8 text, for messages and JSON."""
        return _printable(str(self.path))


class Catalogue(Sequence[InputItem]):
    """The inputs in key order, read by index from a SQLite file; pickles as its file name (for workers).

    The process that built it removes the file on close (or at exit); copies in other processes never do.
    """

    def __init__(self, path: str, count: int, digest: str, held: int):
        self.path, self.count, self.digest = path, count, digest
        self._owner = os.getpid()
        self._local = threading.local()
        self._finalizer = weakref.finalize(self, _remove_owned, path, self._owner, held)

    def __getstate__(self) -> dict:
        return {"path": self.path, "count": self.count, "digest": self.digest, "owner": self._owner}

    def __setstate__(self, state: dict) -> None:
        self.path, self.count, self.digest = state["path"], state["count"], state["digest"]
        self._owner, self._local, self._finalizer = state["owner"], threading.local(), None

    def _db(self) -> sqlite3.Connection:
        """A read-only connection of this thread and process."""
        db = getattr(self._local, "db", None)
        if db is None or self._local.pid != os.getpid():
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            self._local.db, self._local.pid = db, os.getpid()
        return db

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> InputItem:  # type: ignore[override]
        if not -self.count <= index < self.count:
            raise IndexError(index)
        query = "SELECT path, key, members FROM items WHERE id = ?"
        row = self._db().execute(query, (index % self.count + 1,))
        return _item(*row.fetchone())

    def __iter__(self) -> Iterator[InputItem]:
        for row in self._db().execute("SELECT path, key, members FROM items ORDER BY id"):
            yield _item(*row)

    def close(self) -> None:
        """Remove the file (only in the process that built it)."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> Catalogue:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _item(path: bytes, key: str, members: bytes | None) -> InputItem:
    """An InputItem from its catalogue row."""
    files = None if members is None else tuple(Path(os.fsdecode(m)) for m in members.split(b"\0"))
    return InputItem(Path(os.fsdecode(path)), key, files)


def _remove_owned(path: str, owner: int, held: int) -> None:
    """Remove the file and close the descriptor holding it, in the process that built it."""
    if os.getpid() == owner:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(held)


def _new_file() -> tuple[int, str]:
    """A new catalogue file, held (on Linux) while this process or a child it forked lives; first removes
    the ones that killed runs left."""
    folder = tempfile.gettempdir()
    if _HELD:
        _remove_abandoned(folder)
    fd, path = tempfile.mkstemp(prefix=_PREFIX, suffix=_SUFFIX, dir=folder)
    if _HELD:
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd, path


def _remove_abandoned(folder: str) -> None:
    """Remove the catalogue files in `folder` that no process holds, unless just made (not held yet)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    now = time.time()
    for entry in entries:
        if not (entry.name.startswith(_PREFIX) and entry.name.endswith(_SUFFIX)):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < _ABANDONED_AFTER:
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # gone already, or another user's
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(entry.path)
        except OSError:  # held by a live run, or not this user's to remove
            pass
        finally:
            os.close(fd)


def read_list(source: str) -> Iterator[str]:
    """The paths of an --inputs-from file (or "-": standard input), one per line; blank lines are skipped."""
    try:
        stream = sys.stdin.buffer if source == "-" else open(source, "rb")  # noqa: SIM115 - closed below
    except OSError as error:
        raise InputError(f"cannot read --inputs-from {_printable(source)}: {error.strerror}") from None
    with contextlib.ExitStack() as stack:
        if source != "-":
            stack.enter_context(stream)
        for line in stream:
            line = line.rstrip(b"\n").removesuffix(b"\r")
            if line:
                yield os.fsdecode(line)


Group = Callable[[str, Sequence[str]], Iterable[tuple[str, Sequence[str] | None]]]


def discover(
    inputs: Sequence[str | Path],
    reserved: Collection[str] = (),
    exclude: str | Path | None = None,
    accepts: Callable[[str], bool] | None = None,
    group: Group | None = None,
) -> list[InputItem]:
    """The inputs as a list (see ``catalogue``), for callers with few of them."""
    with catalogue(inputs, reserved, exclude, accepts=accepts, group=group) as found:
        return list(found)


def catalogue(
    inputs: Sequence[str | Path],
    reserved: Collection[str] = (),
    exclude: str | Path | None = None,
    listed: Iterable[str] | None = None,
    allow_empty: bool = False,
    accepts: Callable[[str], bool] | None = None,
    group: Group | None = None,
) -> Catalogue:
    """Expand files, folders, glob patterns and listed paths into inputs with unique keys, by key.

    - A path to a file is taken whatever its extension; a folder is walked recursively and keeps the
      files the modality `accepts` by name (default: pictures, by extension); an argument that is not an
      existing path but contains ``*``, ``?`` or ``[`` is a glob pattern (``**`` matches any depth), whose
      matching folders are walked and matching files kept when accepted.
    - `listed` paths (from --inputs-from) are taken literally, never as patterns: a folder is walked, any
      other path is taken as a file (a missing one ends as a per-image error, not a usage error).
    - Walks and wildcards skip hidden names (starting with ``.``), follow symlinked folders without ever
      entering the same real folder twice (a folder reachable directly is listed under its direct path,
      not through a symlink), skip special files (pipes, devices), skip unreadable subfolders with a
      logged warning, and LIST broken symlinks with an image extension so that they end as a visible
      per-image error rather than vanish.
    - Keys are relative to the deepest common folder of the inputs (a file counts as its folder,
      a pattern as its literal leading folders), made printable and unique (see ``_unique_keys``).
    - Nothing inside the folder `exclude` (the output folder) is taken, so reruns never explain outputs.
    - Keys never start with a name in `reserved` (names the output folder uses itself).
    - `group(folder, paths)` (the modality's, for inputs made of several files) is handed every folder's
      files found, whichever way (walks, patterns, arguments, lists), and yields the inputs they make:
      (input path, its member files, or None for a file that is an input alone). An input path may be
      the folder itself (keys then stay relative to the folder above it) or a name in it.
    - Raises InputError for no inputs at all, a missing path, or an argument yielding no image (the
      latter two only when `allow_empty` is false).
    """
    if not inputs and listed is None:
        raise InputError("no inputs given")
    held, path = _new_file()
    try:
        db = sqlite3.connect(path)
        with contextlib.closing(db):
            for pragma in ("journal_mode = OFF", "synchronous = OFF", "temp_store = FILE"):
                db.execute(f"PRAGMA {pragma}")
            db.execute("CREATE TABLE paths (path BLOB PRIMARY KEY, folder BLOB, members BLOB) WITHOUT ROWID")
            accepts = accepts or modalities.accepts("images")
            common = _collect(db, inputs, listed, exclude, allow_empty, accepts)
            if group is not None:
                common = _group(db, group, common)
            count, digest = _key(db, common, reserved)
            if group is not None and not count and inputs and not allow_empty:
                raise InputError(f"no inputs found in {', '.join(_printable(os.fspath(i)) for i in inputs)}")
            db.commit()
    except BaseException:
        _remove_owned(path, os.getpid(), held)
        raise
    return Catalogue(path, count, digest, held)


def _collect(
    db: sqlite3.Connection,
    inputs: Sequence[str | Path],
    listed: Iterable[str] | None,
    exclude: str | Path | None,
    allow_empty: bool,
    accepts: Callable[[str], bool],
) -> str | None:
    """Insert every input file's absolute path; returns the deepest common folder (None: no inputs)."""
    skip, excluded = set(), os.path.realpath(exclude) + os.sep if exclude is not None else None
    if exclude is not None and os.path.isdir(exclude):
        skip.add(_folder_id(str(exclude)))

    def outside(file: str, real: Callable[[str], str] = os.path.realpath) -> bool:
        return excluded is None or not real(file).startswith(excluded)

    bases: list[str] = []
    for raw in inputs:
        text = os.fspath(raw)
        path = os.path.abspath(text)
        shown = _printable(text)
        _refuse_virtual(path, shown)
        if os.path.isdir(path):
            try:
                with os.scandir(path):
                    pass
            except OSError as error:
                raise InputError(f"cannot read folder {shown}: {error.strerror}") from None
            base, files = path, _walk([path], accepts, skip)
            empty = f"no image files found in folder {shown}"
        elif os.path.lexists(path):
            _refuse_special(path, shown)
            base, files, empty = os.path.dirname(path), iter([path] if outside(path) else []), ""
        elif glob.has_magic(path):
            base = _glob_base(path)
            if allow_empty and not os.path.isdir(base):
                raise InputError(f"no such folder: {_printable(base)} (in the pattern {shown})")
            files = _glob_files(path, accepts, skip, outside)
            empty = f"no image files match {shown}"
        else:
            raise InputError(f"no such file or folder: {shown}")
        bases.append(base)
        if not _insert(db, files) and empty and not allow_empty:
            raise InputError(empty)
    if listed is not None:
        real_folder = functools.lru_cache(maxsize=4096)(os.path.realpath)
        common = _insert_listed(db, listed, accepts, skip, outside, real_folder)
        if common is None and not allow_empty:
            raise InputError("--inputs-from lists no paths")
        bases += [common] if common is not None else []
    return os.path.commonpath(bases) if bases else None


def _insert_listed(db, listed, accepts, skip, outside, real_folder) -> str | None:
    """Insert listed paths (folders walked); returns the deepest folder common to them (None: none)."""
    common = last = None

    def files() -> Iterator[str]:
        nonlocal common, last
        for line in listed:
            path = os.path.abspath(line)
            _refuse_virtual(path, _printable(line))
            is_folder = os.path.isdir(path)
            folder, name = (path, "") if is_folder else os.path.split(path)
            real = real_folder(path) if is_folder else os.path.join(real_folder(folder), name)
            if not outside(real + os.sep, real=str):  # OUT itself, or in it
                continue
            if folder != last:  # find lists a folder's files together: one commonpath per folder
                last = folder
                common = folder if common is None else os.path.commonpath([common, folder])
            if is_folder:
                yield from _walk([path], accepts, skip)
            else:
                yield path

    _insert(db, files())
    return common


VIRTUAL = ("/proc", "/sys", "/dev")  # the kernel's file systems: endless files, loops, devices (not /dev/shm)


def _refuse_virtual(path: str, shown: str) -> None:
    """InputError for a path on one of the kernel's virtual file systems."""
    real = os.path.realpath(path)
    if real == "/dev/shm" or real.startswith("/dev/shm/"):  # a RAM disk: ordinary files
        return
    root = next((v for v in VIRTUAL if real == v or real.startswith(v + os.sep)), None)
    if root is not None:
        raise InputError(f"{shown} is under {root}, a virtual file system of the kernel, not images")


def _refuse_special(path: str, shown: str) -> None:
    """InputError for an argument that is a device, pipe or socket (reading one may never end)."""
    with contextlib.suppress(OSError):  # a broken link stays an input: it ends as an error line
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
            kind = (
                "named pipe"
                if stat.S_ISFIFO(mode)
                else "device"
                if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "socket"
            )
            raise InputError(f"{shown} is a {kind}, not an image file")


def _insert(db: sqlite3.Connection, files: Iterable[str]) -> int:
    """Insert absolute file paths (duplicates ignored); returns how many were offered."""
    offered, chunk = 0, []
    for file in files:
        chunk.append((os.fsencode(file), os.fsencode(os.path.dirname(file))))
        if len(chunk) == _CHUNK:
            db.executemany("INSERT OR IGNORE INTO paths VALUES (?, ?, NULL)", chunk)
            offered, chunk = offered + len(chunk), []
    db.executemany("INSERT OR IGNORE INTO paths VALUES (?, ?, NULL)", chunk)
    return offered + len(chunk)


def _group(db: sqlite3.Connection, group: Group, common: str | None) -> str | None:
    """Replace the files found by the inputs `group` makes of each folder's files; returns the folder keys
    are relative to (the parent of `common` when an input is that folder itself)."""
    db.execute("CREATE TABLE grouped (path BLOB PRIMARY KEY, folder BLOB, members BLOB) WITHOUT ROWID")
    rows = db.execute("SELECT folder, path FROM paths ORDER BY folder, path")
    chunk, whole = [], False
    for folder, files in itertools.groupby(rows, key=lambda row: row[0]):
        found = group(os.fsdecode(folder), [os.fsdecode(path) for _, path in files])
        for path, members in found:
            whole = whole or path == common
            joined = None if members is None else b"\0".join(os.fsencode(m) for m in members)
            chunk.append((os.fsencode(path), folder, joined))
            if len(chunk) == _CHUNK:
                db.executemany("INSERT OR IGNORE INTO grouped VALUES (?, ?, ?)", chunk)
                chunk = []
    db.executemany("INSERT OR IGNORE INTO grouped VALUES (?, ?, ?)", chunk)
    db.execute("DROP TABLE paths")
    db.execute("ALTER TABLE grouped RENAME TO paths")
    return os.path.dirname(common) if whole and common is not None else common


def _key(db: sqlite3.Connection, common: str | None, reserved: Collection[str]) -> tuple[int, str]:
    """Give every path its unique key and write the `items` table in key order; returns (count, digest)."""
    db.execute("CREATE TABLE keyed (id INTEGER PRIMARY KEY, path BLOB, key TEXT, folded TEXT, members BLOB)")
    prefix = (common.rstrip(os.sep) + os.sep) if common else ""
    reserved_folded = frozenset(_fold(name) for name in reserved)

    def relative(raw: bytes) -> str:
        path = os.fsdecode(raw)
        return path[len(prefix) :] if path.startswith(prefix) else os.path.relpath(path, common)

    rows = []
    for raw, members in db.execute("SELECT path, members FROM paths ORDER BY path"):
        key = _avoid_reserved(_printable(relative(raw)).replace(os.sep, "/"), reserved_folded)
        rows.append((raw, key, _fold(key), members))
        if len(rows) == _CHUNK:
            db.executemany("INSERT INTO keyed (path, key, folded, members) VALUES (?, ?, ?, ?)", rows)
            rows = []
    db.executemany("INSERT INTO keyed (path, key, folded, members) VALUES (?, ?, ?, ?)", rows)
    db.execute("DROP TABLE paths")
    db.execute("CREATE INDEX keyed_folded ON keyed (folded)")
    clashing = db.execute(
        "SELECT id, path, key FROM keyed WHERE folded IN "
        "(SELECT folded FROM keyed GROUP BY folded HAVING COUNT(*) > 1)"
    ).fetchall()
    if clashing:

        def taken(folded: str) -> bool:
            found = db.execute("SELECT 1 FROM keyed WHERE folded = ? LIMIT 1", (folded,))
            return found.fetchone() is not None

        rows = [(i, relative(raw), key) for i, raw, key in clashing]
        renamed = _rename_clashes(rows, taken)
        db.executemany("UPDATE keyed SET key = ? WHERE id = ?", [(k, i) for i, k in renamed.items()])
    db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, path BLOB, key TEXT, members BLOB)")
    db.execute("INSERT INTO items (path, key, members) SELECT path, key, members FROM keyed ORDER BY key")
    db.execute("DROP TABLE keyed")
    digest = hashlib.sha256()
    count = 0
    for path, key, members in db.execute("SELECT path, key, members FROM items ORDER BY id"):
        digest.update(path + b"\0" + key.encode() + b"\0")
        if members is not None:  # a list of files is an input of its own: its digest says which
            digest.update(b"\1" + members + b"\0")
        count += 1
    return count, digest.hexdigest()


def _kind(entry: os.DirEntry[str]) -> str | None:
    """Classify a directory entry as "dir", "file" (regular file or broken symlink) or None (skip)."""
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file():
            return "file"
    except OSError:  # a symlink loop: treated like a broken link below
        pass
    return "file" if entry.is_symlink() and not os.path.exists(entry.path) else None


def _entries(folder: str) -> Iterator[os.DirEntry[str]]:
    """The entries of a folder as the OS lists them (a logged warning when it cannot be read)."""
    try:
        with os.scandir(folder) as entries:
            yield from entries
    except OSError as error:
        logger.warning("skipping folder %s: %s", _printable(folder), error.strerror)


def _folder_id(folder: str) -> tuple[int, int] | None:
    """The (device, inode) identity of a folder after symlinks, or None if it cannot be reached."""
    try:
        st = os.stat(folder)
    except OSError as error:
        logger.warning("skipping folder %s: %s", _printable(folder), error.strerror)
        return None
    return st.st_dev, st.st_ino


def _walk(
    roots: Sequence[str], accepts: Callable[[str], bool], skip: Collection[tuple[int, int]] = ()
) -> Iterator[str]:
    """Yield the accepted files under the given folders, visiting each real folder once (direct paths first).

    Folders whose identity is in `skip` are never entered. The order is the file system's: the
    catalogue sorts.
    """
    visited: set[tuple[int, int]] = set(skip)
    current = sorted(r for r in roots if not os.path.islink(r))
    later = sorted(r for r in roots if os.path.islink(r))
    while current:
        stack = current[::-1]
        while stack:
            folder = stack.pop()
            ident = _folder_id(folder)
            if ident is None or ident in visited:
                continue
            visited.add(ident)
            for entry in _entries(folder):
                if entry.name.startswith("."):
                    continue
                kind = _kind(entry)
                if kind == "dir":
                    (later if entry.is_symlink() else stack).append(entry.path)
                elif kind == "file" and accepts(entry.name):
                    yield entry.path
        current, later = sorted(later), []


def _glob_base(pattern: str) -> str:
    """The literal leading folder of an absolute, normalised glob pattern."""
    return _split_pattern(pattern)[0]


def _split_pattern(pattern: str) -> tuple[str, list[str]]:
    """An absolute, normalised glob pattern as its literal leading folder and the components after it."""
    parts = pattern.split(os.sep)
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    return os.sep.join(parts[:first]) or os.sep, parts[first:]


def _glob_files(
    pattern: str,
    accepts: Callable[[str], bool],
    skip: Collection[tuple[int, int]],
    outside: Callable[[str], bool],
) -> Iterator[str]:
    """Files matching a pattern: matched files the modality accepts, and walks of matched folders."""
    folders = []
    for kind, path in _glob(pattern):
        if kind == "dir":
            folders.append(path)
        elif accepts(os.path.basename(path)) and outside(path):
            yield path
    yield from _walk(folders, accepts, skip)


def _glob(pattern: str) -> Iterator[tuple[str, str]]:
    """Match an absolute, normalised glob pattern: yields ("file" | "dir", path) for each match.

    Each component matches one name (``fnmatch`` syntax, hidden names only when the component starts with
    ``.``); a ``**`` component matches any number of folders. Symlink loops are cut by visiting each real
    folder at most once per pattern position.
    """
    base, parts = _split_pattern(pattern)
    if not os.path.isdir(base):
        return
    seen: set[tuple[tuple[int, int], int]] = set()
    stack, later = [(base, 0)], []  # folders reached through a symlink wait until the direct ones are done
    while stack or later:
        if not stack:
            stack, later = sorted(later, reverse=True), []
        folder, i = stack.pop()
        ident = _folder_id(folder)
        if ident is None or (ident, i) in seen:
            continue
        seen.add((ident, i))
        part, last = parts[i], i == len(parts) - 1
        if part == "**" and last:
            yield "dir", folder  # the walk covers every depth below
            continue
        if part == "**":
            stack.append((folder, i + 1))
        for entry in _entries(folder):
            if entry.name.startswith(".") and not part.startswith("."):
                continue
            if part != "**" and not fnmatch.fnmatchcase(entry.name, part):
                continue
            kind = _kind(entry)
            if last and part != "**":
                if kind is not None:
                    yield kind, entry.path
            elif kind == "dir":
                (later if entry.is_symlink() else stack).append((entry.path, i if part == "**" else i + 1))


def _escape_char(char: str) -> str:
    """Percent-encode an undecodable byte (surrogate escape), control character or line break."""
    if "\udc80" <= char <= "\udcff":
        return f"%{ord(char) - 0xDC00:02X}"
    if unicodedata.category(char) in ("Cc", "Zl", "Zp"):
        return "".join(f"%{byte:02X}" for byte in char.encode())
    return char


def _printable(text: str) -> str:
    """Text safe to print on one line and to use in a file name: valid UTF-8, no control characters."""
    text = os.fsencode(text).decode("utf-8", "surrogateescape")
    return text if text.isprintable() else "".join(map(_escape_char, text))


def _unique_keys(relative: Sequence[str], reserved: Collection[str] = ()) -> list[str]:
    """Turn distinct relative paths into distinct printable POSIX keys.

    Undecodable bytes, control characters and line breaks become ``%XX``. Keys that would then be equal
    ignoring case (equal on a case-insensitive output disk) get ``~2``, ``~3``... before the extension,
    the unchanged name (then the smallest raw name) keeping the plain key. Equality also ignores
    Unicode normalisation (macOS disks). A first component in `reserved` (names the output folder
    uses itself) gets a ``~`` appended. (The catalogue does the same on disk.)
    """
    reserved_folded = frozenset(_fold(name) for name in reserved)
    safe = [_avoid_reserved(_printable(r).replace(os.sep, "/"), reserved_folded) for r in relative]
    folded = [_fold(key) for key in safe]
    counts: dict[str, int] = {}
    for f in folded:
        counts[f] = counts.get(f, 0) + 1
    rows = [(i, relative[i], safe[i]) for i in range(len(safe)) if counts[folded[i]] > 1]
    keys = list(safe)
    for i, key in _rename_clashes(rows, counts.__contains__).items():
        keys[i] = key
    return keys


def _rename_clashes(rows: list[tuple[int, str, str]], taken: Callable[[str], bool]) -> dict[int, str]:
    """For (id, relative path, key) rows whose keys clash once folded: id -> new key for all but one of each.

    The key that needed no escaping (then the smallest raw name) keeps it; `taken(folded)` says whether
    any key already folds to that.
    """
    claimed: set[str] = set()
    added: set[str] = set()
    renamed = {}
    for i, _relative, key in sorted(rows, key=lambda row: (row[2] != row[1], os.fsencode(row[1]))):
        folded = _fold(key)
        if folded not in claimed:
            claimed.add(folded)
            continue
        stem, ext = os.path.splitext(key)
        n = 2
        while _fold(f"{stem}~{n}{ext}") in added or taken(_fold(f"{stem}~{n}{ext}")):
            n += 1
        renamed[i] = f"{stem}~{n}{ext}"
        added.add(_fold(renamed[i]))
    return renamed


def _fold(key: str) -> str:
    """The form under which two keys name the same file on case- and normalisation-insensitive disks."""
    return unicodedata.normalize("NFC", key).casefold()


def _avoid_reserved(key: str, reserved_folded: Collection[str]) -> str:
    """Append ``~`` to the first path component when it is a reserved name (given folded)."""
    first, sep, rest = key.partition("/")
    if _fold(first) in reserved_folded:
        return f"{first}~{sep}{rest}"
    return key
