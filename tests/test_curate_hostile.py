"""Curation of a hostile corpus (tests/hostile_corpus.py): every entry accounted for in the
manifest, the corpus unchanged, nothing outside it read, nothing that blocks opened, and
the stage done within a time bound. Then the cases a generated tree cannot hold: a worker
that dies, a file over the CPU budget, a folder we may not list (as root), Rich markup."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import pytest

from simone.config import preset
from simone.data.curate import curate, print_summary
from tests.hostile_corpus import KEPT, SECRET, build_hostile_corpus, remove_tree, snapshot
from tests.curate_helpers import book, meta, read_jsonl, write_doc

TIME_BOUND_S = 60.0  # generous: the stage takes a few seconds here
# far below the default: a regression to a quadratic regex fails fast (timed_out), not hangs
CPU_BUDGET_S = 20.0
_opened: list[tuple[str, str]] | None = None  # (event, path) while an audited curation runs


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event in ("open", "os.scandir", "os.listdir") and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append((event, os.fsdecode(args[0])))


sys.addaudithook(_audit)  # cannot be removed; records only while `_opened` is a list


def _cfg(workers: int = 1, **curate_settings):
    cfg = preset("tiny")
    cfg.curate.workers = workers
    cfg.curate.max_file_seconds = CPU_BUDGET_S
    for k, v in curate_settings.items():
        setattr(cfg.curate, k, v)
    return cfg


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    global _opened
    base = tmp_path_factory.mktemp("hostile")
    hc = build_hostile_corpus(base)
    before = snapshot(base)
    data = base / "run" / "data"
    _opened = []
    t0 = time.perf_counter()
    try:
        # in-process, so the audit hook sees every open
        result = curate(hc.root, data, _cfg(workers=1), progress=False)
    finally:
        opened, _opened = _opened, None
    wall = time.perf_counter() - t0
    lines = read_jsonl(data / "manifest.jsonl")
    yield {"hc": hc, "base": base, "data": data, "result": result, "lines": lines, "wall": wall,
           "opened": opened, "before": before}
    remove_tree(base)  # pytest's own cleanup recurses once per level of the 1,000-deep tree


def test_every_entry_has_exactly_one_manifest_line_with_its_reason(hostile):
    hc, lines = hostile["hc"], hostile["lines"]
    paths = [r["path"] for r in lines]
    assert len(paths) == len(set(paths)), "a path has more than one manifest line"
    assert sorted(paths) == sorted(hc.expected), set(paths) ^ set(hc.expected)
    for r in lines:
        want = hc.expected[r["path"]]
        if want == KEPT:
            assert r["status"] == "kept" and r["reasons"] == [], (r["path"], r["reasons"], r["notes"])
        else:
            assert want in r["reasons"], (r["path"], want, r["reasons"], r["notes"])
            assert r["notes"].get(want), (r["path"], "no note says why")
    assert set(hostile["result"].ignored) == hc.ignored


def test_nothing_in_the_tree_vanished(hostile):
    """Independently of the expected table: every entry of the tree is a manifest line, an
    ignored file, a sidecar paired with a listed text, a walked folder, or lies inside a
    folder that has a line of its own (a dot-folder, a folder we may not list)."""
    root = hostile["hc"].root
    listed = {r["path"] for r in hostile["lines"]} | set(hostile["result"].ignored)
    missing = []
    for rel, is_walked_dir in _tree(root):
        if rel in listed or is_walked_dir or any(rel.startswith(p + "/") for p in listed):
            continue
        if rel.endswith(".json") and rel[:-5] + ".txt" in listed:
            continue
        missing.append(rel)
    assert not missing


def _tree(root: Path):
    """(printable relative path, walked-folder?) of every entry, links not followed."""
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        here = root / rel_dir if rel_dir else root
        try:
            names = os.listdir(here)
        except PermissionError:
            continue
        for name in names:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            shown = rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            walked = stat.S_ISDIR(os.lstat(root / rel).st_mode) and not name.startswith(".") and not name.endswith(".txt")
            if walked:
                stack.append(rel)
            yield shown, walked


def test_corpus_is_unchanged_and_nothing_outside_was_read(hostile):
    assert snapshot(hostile["base"] / "corpus") == {k: v for k, v in hostile["before"].items() if "/corpus/" in k}
    assert snapshot(hostile["hc"].outside) == {k: v for k, v in hostile["before"].items() if "/outside/" in k}
    for name in ("manifest.jsonl", "documents.jsonl", "report.html", "curate.stamp.json"):
        assert SECRET not in (hostile["data"] / name).read_text(encoding="utf-8"), name
    outside = (str(hostile["hc"].outside) + os.sep, os.path.realpath(hostile["hc"].outside) + os.sep, "/proc/", "/dev/")
    opened = hostile["opened"]
    assert opened, "the audit hook saw nothing: the check below would be empty"
    # links in the corpus are in `never_opened`: a path opened through one shows up there
    leaked = [(e, p) for e, p in opened if p.startswith(outside)]
    assert not leaked
    never = {str(p) for p in hostile["hc"].never_opened}
    touched = [(e, p) for e, p in opened if p in never or any(p.startswith(n + "/") for n in never)]
    assert not touched


def test_stage_finishes_within_the_time_bound_and_reruns(hostile, tmp_path):
    assert hostile["wall"] < TIME_BOUND_S and hostile["result"].seconds < TIME_BOUND_S
    spaces = next(r for r in hostile["lines"] if r["path"] == "slow/x/spaces.txt")
    assert spaces["bytes"] > 2_000_000 and spaces["sha256"]  # read and cleaned, not given up
    # the same result from a process pool (records built in workers, pickled back)
    again = curate(hostile["hc"].root, tmp_path / "data", _cfg(workers=2), progress=False)
    assert (tmp_path / "data" / "manifest.jsonl").read_bytes() == (hostile["data"] / "manifest.jsonl").read_bytes()
    assert again.seconds < TIME_BOUND_S


def test_summary_prints_markup_names_literally_also_when_reused(hostile, capsys):
    from rich.console import Console

    def summary(result) -> str:
        print_summary(result, Console(width=200, color_system=None))
        return capsys.readouterr().out

    out = summary(hostile["result"])
    assert "notes[/].md" in out and "[/]notes.md" in out and "[bold]odd" in out
    reused = curate(hostile["hc"].root, hostile["data"], _cfg(), progress=False)  # the stamp was written
    assert reused.reused
    out = summary(reused)
    assert "notes[/].md" in out and "[bold]odd" in out


def test_built_every_case_this_machine_allows(hostile):
    allowed = {"device node", "permission-denied folder"} if os.geteuid() != 0 else {"permission-denied folder"}
    assert set(hostile["hc"].not_built) <= allowed, hostile["hc"].not_built


# ----------------------------------------------------------------------------- what a tree cannot hold


def _books(root: Path, n: int, seed: int = 700) -> None:
    for i in range(n):
        write_doc(root, f"d/s/{i}.txt", book(f"Tale {i}", "Ed Orr", seed + i), meta(f"Tale {i}", "Ed Orr", "d", "s"))


def test_a_worker_that_dies_costs_only_its_file(tmp_path, monkeypatch):
    import simone.data.curate as curate_module

    root = tmp_path / "corpus"
    _books(root, 5)
    write_doc(root, "d/s/boom.txt", book("Boom", "Ed Orr", 799))
    real = curate_module._process_file_inner

    def dies_on_boom(index, sf, st):
        if sf.rel.endswith("boom.txt"):
            os._exit(9)  # what the out-of-memory killer does to a worker
        return real(index, sf, st)

    monkeypatch.setattr(curate_module, "_process_file_inner", dies_on_boom)  # forked workers inherit it
    curate(root, tmp_path / "data", _cfg(workers=2), progress=False)
    m = {r["path"]: r for r in read_jsonl(tmp_path / "data" / "manifest.jsonl")}
    assert sorted(m) == sorted([f"d/s/{i}.txt" for i in range(5)] + ["d/s/boom.txt"])
    assert m["d/s/boom.txt"]["reasons"] == ["unreadable"] and "worker process" in m["d/s/boom.txt"]["notes"]["unreadable"]
    assert all(m[f"d/s/{i}.txt"]["status"] == "kept" for i in range(5))


def test_a_file_over_its_cpu_budget_is_given_up(tmp_path, monkeypatch):
    import simone.data.curate as curate_module

    root = tmp_path / "corpus"
    _books(root, 3)
    real = curate_module.clean_text

    def spins_on_tale_1(text, curate=True):
        while "TALE 1" in text:  # a pathological text: never returns
            pass
        return real(text, curate)

    monkeypatch.setattr(curate_module, "clean_text", spins_on_tale_1)
    t0 = time.perf_counter()
    curate(root, tmp_path / "data", _cfg(max_file_seconds=0.5), progress=False)
    assert time.perf_counter() - t0 < 30
    m = {r["path"]: r for r in read_jsonl(tmp_path / "data" / "manifest.jsonl")}
    assert m["d/s/1.txt"]["reasons"] == ["timed_out"] and "max_file_seconds" in m["d/s/1.txt"]["notes"]["timed_out"]
    assert m["d/s/0.txt"]["status"] == "kept" and m["d/s/2.txt"]["status"] == "kept"


def test_the_size_limit_is_a_setting_and_too_large_files_are_not_read(tmp_path):
    global _opened
    root = tmp_path / "corpus"
    _books(root, 2)
    write_doc(root, "d/s/long.txt", book("Long Tale", "Ed Orr", 798, 6000))
    size = (root / "d/s/long.txt").stat().st_size
    _opened = []
    try:
        curate(root, tmp_path / "data", _cfg(max_file_bytes=size - 1), progress=False)
    finally:
        opened, _opened = _opened, None
    m = {r["path"]: r for r in read_jsonl(tmp_path / "data" / "manifest.jsonl")}
    assert m["d/s/long.txt"]["reasons"] == ["too_large"] and m["d/s/long.txt"]["sha256"] is None
    assert "curate.max_file_bytes" in m["d/s/long.txt"]["notes"]["too_large"]
    assert not [p for _, p in opened if p.endswith("long.txt")]
    assert m["d/s/0.txt"]["status"] == "kept"


def test_a_folder_that_cannot_be_listed_gets_a_line(tmp_path, monkeypatch):
    """Simulated (root may list any folder): listing `d/locked` fails as it would for a user."""
    import simone.data.corpus as corpus_module

    root = tmp_path / "corpus"
    _books(root, 2)
    write_doc(root, "d/locked/inside.txt", book("Locked", "Ed Orr", 797))
    real_scandir = os.scandir

    def scandir(path=".", *a):
        if str(path).endswith("/d/locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path, *a)

    monkeypatch.setattr(corpus_module.os, "scandir", scandir)
    curate(root, tmp_path / "data", _cfg(), progress=False)
    m = {r["path"]: r for r in read_jsonl(tmp_path / "data" / "manifest.jsonl")}
    assert sorted(m) == ["d/locked", "d/s/0.txt", "d/s/1.txt"]
    assert m["d/locked"]["reasons"] == ["unreadable"] and "Permission denied" in m["d/locked"]["notes"]["unreadable"]


def test_status_prints_run_names_that_look_like_markup(tmp_path):
    from rich.console import Console

    from simone.monitor.terminal import status_report
    from tests.test_monitor_api import make_run

    make_run(tmp_path, "[@click=x]notes", "finished")  # (a name cannot hold the "[/" that crashes)
    make_run(tmp_path, "[bold]x", "running")
    console = Console(record=True, width=120, color_system=None)
    code, lines = status_report(None, tmp_path)
    console.print(*lines, sep="\n")
    assert code == 0
    out = console.export_text()
    assert "[@click=x]notes" in out and "[bold]x" in out
    console = Console(record=True, width=120, color_system=None)
    code, lines = status_report("nope[/]", tmp_path)
    console.print(*lines, sep="\n")
    assert code == 1
    assert "nope[/]" in console.export_text()
