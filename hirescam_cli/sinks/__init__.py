"""Sinks: where an explained input's outputs go and how a rerun knows it is done.

A sink is a class built from OUT (an `outputs.OutputDir`, which knows the pictures' format) and the writer
counts (processes, else threads), with
    map_paths(key, method, cls, raw, extra)  a map's entry in the summary: where its files go (relative to
                                       OUT), {format: picture, "raw": raw or None, field: path} with the
                                       modality's other files (`extra`: summary field -> name suffix)
    summary_path(key)                  where the input's summary goes (results.jsonl records it)
    resume_check(fingerprint)          a picklable test (item, sha256) -> done, run in the loader's workers
    write(...)                         queue a batch's pictures, raw maps and summaries; futures per input
    shutdown()                         wait for every write
The ledgers (results.jsonl, run.json) and the OUT lock do not depend on it. The first sink is a folder per
input (folders.py). A new one is a file here plus one line in SINKS (see docs/extending.md).
"""

import importlib

from ..errors import UsageError

SINKS = {"folders": "folders.FolderSink"}  # output.sink -> its class, in this package


def open_sink(kind: str, out, writers: int, threads: int = 4):
    """The sink `output.sink` names, writing under `out` with `writers` processes (0: `threads` threads)."""
    if kind not in SINKS:
        raise UsageError(f"output.sink = {kind!r} is not allowed: expected one of {', '.join(SINKS)}")
    module, _, name = SINKS[kind].rpartition(".")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)(out, writers, threads)
