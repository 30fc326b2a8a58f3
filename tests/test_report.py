"""`hirescam report`: the page's data from a real run, escaping, relative links, incremental
thumbnails, never touching the run, and odd or broken OUT folders. (tests/test_report_browser.py
loads the same kind of report in Chromium.)"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from PIL import Image
from report_runs import MALICIOUS, cli, many_inputs, report_data, reported_in_small_chunks, shared_run

from hirescam_cli.report import (
    ReportError,
    cards,
    chunks,
    gallery,
    run_files,
    write_eval_page,
    write_report,
)
from hirescam_cli.report.chunks import PAGE_SIZE
from hirescam_cli.report.site import exponent, fixed, method_name
from hirescam_cli.report.thumbnails import THUMB_SIDE, VIEW_SIDE

SAFE_URL = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~/%")


@pytest.fixture(scope="module")
def run_out(tmp_path_factory) -> Path:
    return shared_run(tmp_path_factory)


@pytest.fixture
def out(run_out, tmp_path) -> Path:
    """A private copy of the run (same inputs), for tests that change it."""
    copy = tmp_path / "out"
    shutil.copytree(run_out, copy)
    return copy


class Links(HTMLParser):
    """Every src and href of a page, and the text of its cards' names."""

    def __init__(self):
        super().__init__()
        self.links, self.names, self.tags = [], [], []
        self._in_name = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        self.links += [attrs[k] for k in ("src", "href") if k in attrs]
        self._in_name = tag == "h2" and attrs.get("class") == "name"

    def handle_data(self, data):
        if self._in_name:
            self.names.append(data)
            self._in_name = False


def parse(path: Path) -> Links:
    links = Links()
    links.feed(path.read_text(encoding="utf-8"))
    return links


def data_links(data: dict) -> list[str]:
    found = [f"cards/{digest}.js" for digest, _ in data["chunks"]]
    for image in data["images"]:
        found += ["thumbs/" + image[k] for k in ("o", "v") if image.get(k)]
        for target in image.get("t", []):
            for cell in target["m"]:
                found += ([f"thumbs/{cell[0]}"] if cell[0] else []) + [cell[1]]
    return found


def snapshot(out: Path) -> dict[str, tuple[int, int, str]]:
    """size, mtime and hash of every file of the run (everything but report/)."""
    files = {}
    for path in sorted(out.rglob("*")):
        if path.is_file() and "report" not in path.relative_to(out).parts[:1]:
            files[str(path)] = (
                path.stat().st_size,
                path.stat().st_mtime_ns,
                hashlib.sha256(path.read_bytes()).hexdigest(),
            )
    return files


def thumbs(out: Path) -> set[str]:
    return {
        p.relative_to(out / "report" / "thumbs").as_posix()
        for p in (out / "report" / "thumbs").rglob("*.jpg")
    }


def test_data_has_every_input_in_order_with_its_numbers(run_out):
    data = report_data(run_out)
    data_methods = ("hirescam", "gradcam")
    records = [json.loads(line) for line in (run_out / "results.jsonl").read_text().splitlines()]
    assert [image["s"] for image in data["images"]] == [r["status"] for r in records]
    assert [image["i"] for image in data["images"]] == list(range(len(records)))
    assert data["methods"] == [["hirescam", "HiResCAM"], ["gradcam", "Grad-CAM"]]
    assert data["counts"] == {"ok": 6, "skipped": 0, "error": 1}
    for image, record in zip(data["images"], records, strict=True):
        if record["status"] == "error":
            assert image["e"] == record["error"] and "t" not in image
            continue
        summary = json.loads((run_out / record["summary"]).read_text())
        assert image["n"] == summary["key"] and (image["w"], image["h"]) == (
            summary["width"],
            summary["height"],
        )
        assert len(image["t"]) == len(summary["targets"]) >= 1
        for shown, target in zip(image["t"], summary["targets"], strict=True):
            assert (shown["l"], shown["p"], shown["g"]) == (
                target["label"],
                target["probability"],
                target["completeness_gap"],
            )
            assert (shown["r"], shown["u"]) == (
                target["agreement"]["pearson"],
                target["agreement"]["top20_iou"],
            )
            links = [cell[1] for cell in shown["m"]]
            assert [unquote(link) for link in links] == [
                "../" + target["maps"][m]["png"] for m in data_methods
            ]
            assert all(set(link) <= SAFE_URL for link in links)
    labels = {label for label, _ in data["classes"]}
    assert labels == {t["l"] for image in data["images"] for t in image.get("t", [])}


def test_every_link_is_relative_and_resolves_inside_out(run_out):
    report = run_out / "report"
    page = parse(report / "index.html")
    links = page.links + data_links(report_data(run_out))
    assert "index.js" in links and "assets/report.js" in links and "assets/report.css" in links
    for link in links:
        parts = urlsplit(link)
        assert not parts.scheme and not parts.netloc and not link.startswith("/"), link
        target = (report / unquote(parts.path)).resolve()
        assert target.is_file(), link
        assert target.is_relative_to(run_out.resolve())


def test_thumbnails_are_small_and_upright(run_out):
    data = report_data(run_out)
    image = next(i for i in data["images"] if i["s"] == "ok")
    folder = run_out / "report" / "thumbs"
    with Image.open(folder / image["o"]) as thumb, Image.open(folder / image["v"]) as view:
        assert max(thumb.size) == min(THUMB_SIDE, max(image["w"], image["h"]))
        assert view.size == (image["w"], image["h"])  # under VIEW_SIDE: the original's own size
        assert thumb.size[0] > thumb.size[1] if image["w"] > image["h"] else thumb.size[0] <= thumb.size[1]
    assert max(image["w"], image["h"]) <= VIEW_SIDE
    sizes = [p.stat().st_size for p in folder.rglob("*.jpg")]
    assert max(sizes) < 16_000


def test_first_page_is_in_the_html_with_names_escaped(run_out):
    html = (run_out / "report" / "index.html").read_text(encoding="utf-8")
    page = parse(run_out / "report" / "index.html")
    data = report_data(run_out)
    assert page.names == [image["n"] for image in data["images"][:PAGE_SIZE]]
    assert MALICIOUS in page.names  # shown as text
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;.png" in html
    for script in [run_out / "report" / "index.js", *(run_out / "report" / "cards").iterdir()]:
        assert "<img src=x" not in script.read_text(encoding="utf-8")
    reason = next(i["e"] for i in data["images"] if i["s"] == "error")
    assert html.count(reason) == 2  # the broken file's reason, in the failures table and its card
    assert page.tags.count("script") == 2
    assert "Content-Security-Policy" in html and "script-src 'self'" in html  # no inline script could run


def test_report_never_touches_the_run_and_is_incremental(out):
    before, made = snapshot(out), thumbs(out)
    stamps = {p: p.stat().st_mtime_ns for p in (out / "report" / "thumbs").rglob("*.jpg")}
    write_report(out)
    assert snapshot(out) == before
    assert thumbs(out) == made and all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    png = next(out.glob("sample_00.png/hirescam-*.png"))
    Image.new("RGB", Image.open(png).size, "white").save(png.with_suffix(".new"), "PNG")
    os.replace(png.with_suffix(".new"), png)  # a rerun changed one picture (its files are renamed in)
    write_report(out)
    assert len(thumbs(out) - made) == 1 and len(made - thumbs(out)) == 1
    made = thumbs(out)
    shown = next(i for i in report_data(out)["images"] if i["n"] == "sample_01.png")
    shutil.rmtree(out / "sample_01.png")  # a vanished image: its card says why, its pictures go
    write_report(out)
    gone = next(i for i in report_data(out)["images"] if i["n"] == "sample_01.png")
    assert gone["s"] == "error" and "is missing" in gone["e"]
    assert made - thumbs(out) == {shown["o"], shown["v"]} | {cell[0] for t in shown["t"] for cell in t["m"]}


def test_moved_out_keeps_working(out, tmp_path):
    moved = tmp_path / "elsewhere" / "copy"
    shutil.move(out, moved)
    test_every_link_is_relative_and_resolves_inside_out(moved)


def test_fields_of_newer_runs_show_when_present(out):
    run = json.loads((out / "run.json").read_text())
    run |= {
        "layout": {"kind": "tokens", "grid": [14, 14], "prefix_tokens": 1},
        "identical_by_construction": False,
        "resources": {"workers": 2, "torch_threads": 2, "batch_size": 8},
    }
    (out / "run.json").write_text(json.dumps(run))
    summary_path = out / "sample_00.png" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["targets"][0] |= {"hirescam_prefix_sum": 0.25, "identical_by_construction": True}
    summary_path.write_text(json.dumps(summary))
    html = (write_report(out)).read_text()
    assert "tokens, grid 14 \N{MULTIPLICATION SIGN} 14, 1 prefix tokens" in html
    assert "workers 2, torch_threads 2, batch_size 8" in html and "HiResCAM = Grad-CAM" in html
    target = next(i for i in report_data(out)["images"] if i["n"] == "sample_00.png")["t"][0]
    assert target["f"] == 0.25 and target["x"] is True


def test_a_killed_run_without_ledgers_is_reported_from_its_summaries(out):
    (out / "results.jsonl").unlink()
    (out / "run.json").unlink()
    html = write_report(out).read_text()
    data = report_data(out)
    assert [i["n"] for i in data["images"]] == sorted(i["n"] for i in data["images"])
    assert len(data["images"]) == 6 and {i["s"] for i in data["images"]} == {"ok"}
    assert "results.jsonl is missing" in html


def test_damaged_ledger_lines_and_summaries_are_errors_with_reasons(out):
    with open(out / "results.jsonl", "a") as f:
        f.write("{not json\n")
    (out / "sample_02.png" / "summary.json").write_text("[1, 2")
    data = report_data_after(out)
    reasons = {i["n"]: i.get("e") for i in data["images"] if i["s"] == "error"}
    assert "sample_02.png" in reasons and "unreadable" in reasons["sample_02.png"]
    assert any(name.startswith("results.jsonl line") for name in reasons)


def report_data_after(out: Path) -> dict:
    write_report(out)
    return report_data(out)


def test_report_command_refuses_what_is_not_a_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "absent"):
        assert cli("report", folder) == 2
        err = capsys.readouterr().err
        assert err.startswith("hirescam: error:") and len(err.splitlines()) == 1
    with pytest.raises(ReportError):
        write_report(tmp_path / "empty")


def test_report_command_prints_the_page(out, capsys):
    assert cli("report", out) == 0
    assert capsys.readouterr().out.strip() == str(out / "report" / "index.html")


def test_report_command_leaves_an_out_that_a_run_holds_alone(out, capsys):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from hirescam_cli.lock import OutLock; OutLock({str(out)!r}).acquire(); "
            "print('held', flush=True); import time; time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline() == b"held\n"
        assert cli("report", out) == 4
        assert f"is locked by another run (pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert cli("report", out) == 0


def test_report_folder_that_cannot_be_written_is_exit_3(out, capsys):
    shutil.rmtree(out / "report")
    (out / "report").write_text("in the way")
    assert cli("report", out) == 3
    assert "cannot write the report" in capsys.readouterr().err


def test_number_formats_match_javascript():
    assert [exponent(v) for v in (1.2345e-6, 0.0, -4.8e-7, 12.0, None)] == [
        "1.2e-6",
        "0.0e+0",
        "-4.8e-7",
        "1.2e+1",
        "\N{EN DASH}",
    ]
    assert [fixed(v, 3) for v in (0.99355, 1.0, float("nan"))] == ["0.994", "1.000", "\N{EN DASH}"]
    assert [fixed(v, 2) for v in (0.625, -0.625, 0.125)] == ["0.63", "-0.63", "0.13"]  # ties away from zero
    assert exponent(1.25) == "1.3e+0" and exponent(0.0) == "0.0e+0"


def test_inputs_that_resolve_to_reserved_names_keep_clear_of_report(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("report", "eval.html"):
        Image.new("RGB", (40, 30), "red").save(images / name, format="PNG")
    args = [
        images / "report",
        images / "eval.html",
        "-o",
        tmp_path / "out",
        "--workers",
        "0",
        "-q",
        "--report",
    ]
    assert cli("explain", *args) == 0
    keys = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "report~" in keys and "eval.html~" in keys
    assert {i["n"] for i in report_data(tmp_path / "out")["images"]} == {"report~", "eval.html~"}


EVAL = {
    "images": 3,
    "model": "net <b>",
    "target_layer": "features",
    "methods": {
        "hirescam": {
            "relevance_mass_accuracy": {"mean": 0.5, "low": 0.4, "high": 0.6, "n": 4},
            "faith": {"mean": 0.2, "low": 0.1, "high": 0.3, "n": 4},
        },
        "gradcam": {
            "relevance_mass_accuracy": {"mean": 0.7, "low": 0.6, "high": 0.8, "n": 4},
            "faith": {"mean": 0.1, "low": float("nan"), "high": float("nan"), "n": 1},
        },
    },
    "metrics": {
        "faith": {
            "label": "occlusion <r>",
            "better": "lower",
            "space": "layer grid",
            "reference": "Smith <2024>",
        }
    },
    "per_class": {
        "circle": {"hirescam": {"relevance_mass_accuracy": {"mean": 0.9, "low": 0.8, "high": 1.0, "n": 2}}}
    },
    "curves": {
        "hirescam": {"deletion": [1.0, 0.5, 0.1], "insertion": [0.0, 0.6, 0.9]},
        "gradcam": {"deletion": [1.0, 0.7, 0.2], "insertion": [0.0, 0.4, 0.9]},
    },
    "problems": ["x/<script>.png: no usable mask"],
}


def test_eval_page_renders_whatever_methods_and_metrics_it_gets(tmp_path):
    html = write_eval_page(tmp_path, EVAL).read_text()
    assert "0.500 [0.400, 0.600] <small>n=4</small>" in html
    assert '<td class="best">0.700 [0.600, 0.800]' in html  # mass accuracy: higher is better
    assert '<td class="best">0.100 <small>n=1</small>' in html  # faith: declared lower is better; no interval
    assert "occlusion &lt;r&gt;" in html and "net &lt;b&gt;" in html and "x/&lt;script&gt;.png" in html
    assert "<script" not in html and "Class circle" in html
    assert "Smith &lt;2024&gt;; computed on the target layer&#39;s grid" in html
    assert html.count('src="data:image/png;base64,') == 1 and "1.000, 0.500, 0.100" in html
    assert "href=" not in html  # one file: nothing to fetch


def test_eval_page_without_optional_parts(tmp_path):
    bare = {k: EVAL[k] for k in ("images", "model", "target_layer", "methods", "problems")}
    html = write_eval_page(tmp_path, bare).read_text()
    assert "Per class" not in html and "data:image/png" not in html and "relevance mass accuracy" in html
    assert "Definitions" not in html  # eval.json says nothing of them


def test_eval_writes_eval_html_beside_eval_json(tmp_path, capsys):
    from hirescam_cli.demo.samples import write_samples

    write_samples(tmp_path / "images", tmp_path / "masks", count=1)
    (tmp_path / "labels.txt").write_text("circle\nsquare\ntriangle\nstar\ncross\n")
    assert (
        cli(
            "eval",
            tmp_path / "images",
            "--masks",
            tmp_path / "masks",
            "-o",
            tmp_path / "out",
            "--workers",
            "0",
        )
        == 0
    )
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    html = (tmp_path / "out" / "eval.html").read_text()
    assert len(report["methods"]) == 6
    for method in report["methods"]:
        assert f'<tr><th scope="row">{method_name(method)}</th>' in html
    assert "pointing game" in html and "deletion AUC" in html
    capsys.readouterr()
    assert os.path.getsize(tmp_path / "out" / "eval.html") < 200_000


def test_a_run_with_no_inputs_has_a_page_saying_so(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"model": "m", "counts": {"inputs": 0, "ok": 0}}))
    (tmp_path / "results.jsonl").write_text("")
    html = write_report(tmp_path).read_text()
    assert "The run has no inputs." in html and report_data(tmp_path)["images"] == []


# ---- incremental by design: a report re-reads and rewrites only what changed, and ends up as a
# report made from scratch would be


@pytest.fixture(scope="module")
def many_base(run_out, tmp_path_factory) -> Path:
    """130 inputs of unique keys in chunks of about 8 (CHUNK_MEAN patched), reported once."""
    return reported_in_small_chunks(many_inputs(run_out, tmp_path_factory.mktemp("many") / "out", 130))


@pytest.fixture
def many(many_base, tmp_path, monkeypatch) -> Path:
    """A private copy of it (sizes and mtimes kept: its report is up to date)."""
    monkeypatch.setattr(chunks, "CHUNK_MEAN", 8)
    return Path(shutil.copytree(many_base, tmp_path / "many"))


def spy(monkeypatch) -> dict:
    """Which summaries a report reads, and how many ledger lines it parses."""
    seen = {"summaries": [], "lines": 0}
    read, line = cards.read_summary, run_files._line

    def reading(root, relative):
        seen["summaries"].append(relative)
        return read(root, relative)

    def parsing(record):
        seen["lines"] += 1
        return line(record)

    for module in (cards, gallery):
        monkeypatch.setattr(module, "read_summary", reading)
    monkeypatch.setattr(run_files, "_line", parsing)
    return seen


def kept_files(out: Path) -> dict[str, int]:
    """mtime of every file of the report but those rewritten each time (index.*, manifest.json)."""
    report = out / "report"
    return {
        p.relative_to(report).as_posix(): p.stat().st_mtime_ns
        for p in report.rglob("*")
        if p.is_file() and p.name not in ("index.js", "index.html", "manifest.json")
    }


def names(files: dict[str, int], folder: str) -> set[str]:
    return {name for name in files if name.startswith(folder + "/")}


def assert_as_from_scratch(out: Path, tmp_path: Path) -> None:
    """The report of `out` is what a new report of the same run makes (thumbnails kept, labels by name)."""
    fresh = tmp_path / "fresh"
    shutil.copytree(out, fresh, ignore=lambda folder, _: ["report"] if Path(folder) == out else [])
    shutil.copytree(out / "report" / "thumbs", fresh / "report" / "thumbs")
    write_report(fresh)
    assert thumbs(fresh) == thumbs(out)
    mine, theirs = report_data(out), report_data(fresh)
    for data in (mine, theirs):
        data["rows"] = [[row[0], sorted(data["labels"][i] for i in row[1]), *row[2:]] for row in data["rows"]]
        del data["labels"]
    assert mine == theirs


def test_an_unchanged_run_reads_and_rewrites_nothing(many, monkeypatch):
    data = report_data(many)
    assert len(data["chunks"]) > 8 and sum(count for _, count in data["chunks"]) == 130
    before = kept_files(many)
    seen = spy(monkeypatch)
    write_report(many)
    assert seen == {"summaries": [], "lines": 0}  # not even results.jsonl
    assert kept_files(many) == before and report_data(many) == data


def test_a_changed_input_rewrites_its_chunk_only(many, monkeypatch, tmp_path):
    data = report_data(many)
    key = data["images"][60]["n"]
    path = many / key / "summary.json"
    summary = json.loads(path.read_text())
    summary["targets"][0]["probability"] = 0.5
    path.write_text(json.dumps(summary))
    png = many / summary["targets"][1]["maps"]["gradcam"]["png"]
    Image.new("RGB", Image.open(png).size, "white").save(png)  # and one of its pictures
    before = kept_files(many)
    seen = spy(monkeypatch)
    write_report(many)
    after = kept_files(many)
    assert seen == {"summaries": [f"{key}/summary.json"], "lines": 0}
    for folder in ("cards", "chunks", "thumbs"):
        assert len(names(before, folder) - names(after, folder)) == 1
        assert len(names(after, folder) - names(before, folder)) == 1
    assert {name: before[name] for name in after if name in before} == {
        n: after[n] for n in after if n in before
    }
    assert report_data(many)["images"][60]["t"][0]["p"] == 0.5
    assert_as_from_scratch(many, tmp_path)


@pytest.mark.parametrize("how", ["folder swapped", "picture renamed into it"])
def test_a_picture_replaced_as_a_run_does_is_seen_though_its_summary_is_not(many, monkeypatch, tmp_path, how):
    """A rerun swaps in the input's whole folder (the summary's bytes and mtime may be the same);
    the pictures are not checked one by one, the folder is."""
    data = report_data(many)
    key = data["images"][60]["n"]
    folder = many / key
    summary = json.loads((folder / "summary.json").read_text())
    png = many / summary["targets"][0]["maps"]["hirescam"]["png"]
    white = tmp_path / "white.png"
    Image.new("RGB", Image.open(png).size, "white").save(white)
    if how == "folder swapped":
        staged = tmp_path / "staged"
        staged.mkdir()
        for file in folder.iterdir():
            shutil.copy2(white if file == png else file, staged / file.name)
        folder.rename(tmp_path / "old")
        staged.rename(folder)
    else:
        os.replace(white, png)
    seen = spy(monkeypatch)
    write_report(many)
    assert seen["summaries"] == [f"{key}/summary.json"]
    (before,) = data["images"][60]["t"][0]["m"][0][:1]
    (after,) = report_data(many)["images"][60]["t"][0]["m"][0][:1]
    assert after != before and (many / "report" / "thumbs" / after).is_file()
    assert_as_from_scratch(many, tmp_path)


def test_a_rewritten_ledger_is_matched_to_the_last_report(many, monkeypatch, tmp_path):
    """A resumed run: every input skipped, one gone, one new between two others."""
    data = report_data(many)
    gone = data["images"][20]
    lines = [json.loads(line) for line in (many / "results.jsonl").read_text().splitlines()]
    new = "many/img_0040b.png"
    shutil.copytree(many / "many" / "img_0040.png", many / new)
    summary = json.loads((many / new / "summary.json").read_text())
    for target in summary["targets"]:
        for entry in target["maps"].values():
            entry["png"] = entry["png"].replace("img_0040.png", "img_0040b.png")
    (many / new / "summary.json").write_text(json.dumps(summary | {"key": new}))
    added = {"input": summary["input"], "status": "ok", "summary": f"{new}/summary.json"}
    lines = lines[:20] + lines[21:41] + [added] + lines[41:]
    for line in lines:
        line["status"] = "skipped" if line["status"] == "ok" else line["status"]
    (many / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    before = kept_files(many)
    seen = spy(monkeypatch)
    write_report(many)
    after = report_data(many)
    assert seen == {"summaries": [f"{new}/summary.json"], "lines": 130}
    assert [i["n"] for i in after["images"]] == [i["n"] for i in data["images"][:20]] + [
        i["n"] for i in data["images"][21:41]
    ] + [new] + [i["n"] for i in data["images"][41:]]
    assert {i["s"] for i in after["images"]} == {"skipped", "error"}
    assert not any((many / "report" / "thumbs" / name).exists() for name in cards.thumbnails_of(gone))
    for folder in ("cards", "chunks"):  # only the chunks that held the two inputs changed
        assert len(names(before, folder) & names(kept_files(many), folder)) >= len(data["chunks"]) - 3
    assert_as_from_scratch(many, tmp_path)


def test_a_damaged_manifest_rebuilds_what_it_described(many, monkeypatch, tmp_path):
    data = report_data(many)
    manifest = json.loads((many / "report" / "manifest.json").read_text())
    _, lost, count = manifest["chunks"][3]
    (many / "report" / "chunks" / f"{lost}.json").unlink()
    seen = spy(monkeypatch)
    write_report(many)
    assert len(seen["summaries"]) == count and seen["lines"] == 130  # the ledger told what it held
    assert report_data(many) == data
    assert_as_from_scratch(many, tmp_path)


@pytest.mark.parametrize("damage", ["statuses", "chunks", "not an object"])
def test_a_manifest_of_another_shape_is_rebuilt_not_a_traceback(many, tmp_path, damage):
    data, path = report_data(many), many / "report" / "manifest.json"
    manifest = json.loads(path.read_text())
    if damage == "not an object":
        manifest = [manifest]
    else:
        del manifest[damage]  # as a report of another format left it
    path.write_text(json.dumps(manifest))
    write_report(many)
    assert report_data(many) == data
    assert_as_from_scratch(many, tmp_path)


def test_a_summary_listed_twice_keeps_the_thumbnails_both_cards_use(out):
    lines = (out / "results.jsonl").read_text().splitlines()
    first_ok = next(line for line in lines if json.loads(line)["status"] == "ok")
    (out / "results.jsonl").write_text("\n".join([first_ok, *lines]) + "\n")
    write_report(out)
    (out / "results.jsonl").write_text("\n".join(lines) + "\n")  # one of the two is gone
    write_report(out)
    data = report_data(out)
    assert len(data["images"]) == len(lines)
    used = {name for image in data["images"] for name in cards.thumbnails_of(image)}
    assert used == thumbs(out)
