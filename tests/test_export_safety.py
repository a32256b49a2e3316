"""What `simone export` refuses to write over (an existing file or folder without --force, its
own input, a symlink), and that what it and the atomic writer write is readable as the umask
allows (0644 under umask 022), not private to the writer."""

from __future__ import annotations

import os
import stat
import tarfile

import pytest

from simone.cli import main
from simone.inference.package import package_run
from simone.rundir import RunDir, atomic_write_json
from test_hf_export import _save_model_run


@pytest.fixture(scope="module")
def run(template, tmp_path_factory):
    return _save_model_run(template, tmp_path_factory.mktemp("export_safety") / "run")


def export(*args: str) -> int:
    return main(["export", *args])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ")
    return err


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ----------------------------------------------------------------------------- gguf


def test_gguf_refuses_an_existing_file_unless_forced(run, tmp_path, capsys):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"someone's file")
    assert export("--model", str(run), "--format", "gguf", "--out", str(out)) == 2
    err = one_line_error(capsys)
    assert str(out) in err and "already exists" in err and "--force" in err
    assert out.read_bytes() == b"someone's file"
    assert export("--model", str(run), "--format", "gguf", "--out", str(out), "--force") == 0
    assert out.read_bytes()[:4] == b"GGUF"


def test_gguf_never_writes_over_its_own_input(run, tmp_path, capsys):
    pkg = package_run(RunDir(run), tmp_path / "pkgs")
    before = pkg.read_bytes()
    assert export("--model", str(pkg), "--format", "gguf", "--out", str(pkg), "--force") == 2
    err = one_line_error(capsys)
    assert str(pkg) in err and "ending in .gguf" in err
    assert pkg.read_bytes() == before and tarfile.is_tarfile(pkg)


def test_the_input_is_recognised_by_path_and_by_file(tmp_path):
    from simone.inference.export import ExportError
    from simone.inference.gguf_file import check_gguf_out

    model = tmp_path / "model.gguf"  # named as an output could be
    model.write_bytes(b"weights")
    os.link(model, tmp_path / "same.gguf")
    for out in (model, tmp_path / "sub" / ".." / "model.gguf", tmp_path / "same.gguf"):
        with pytest.raises(ExportError, match="is the model being exported"):
            check_gguf_out(out, model, force=True)


def test_gguf_needs_a_gguf_name(run, tmp_path, capsys):
    assert export("--model", str(run), "--format", "gguf", "--out", str(tmp_path / "model.bin")) == 2
    assert "model.bin: not a .gguf name; give a file name ending in .gguf" in one_line_error(capsys)
    assert not (tmp_path / "model.bin").exists()


def test_gguf_refuses_a_symlink_even_when_forced(run, tmp_path, capsys):
    target = tmp_path / "real.gguf"
    target.write_bytes(b"kept")
    link = tmp_path / "link.gguf"
    link.symlink_to(target)
    assert export("--model", str(run), "--format", "gguf", "--out", str(link), "--force") == 2
    assert "link.gguf: is a symlink" in one_line_error(capsys)
    assert link.is_symlink() and target.read_bytes() == b"kept"


# ----------------------------------------------------------------------------- hf


def test_hf_refuses_a_folder_with_the_users_own_files_unless_forced(run, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    (out / "data.csv").write_text("1,2")
    assert export("--model", str(run), "--format", "hf", "--out", str(out)) == 2
    err = one_line_error(capsys)
    assert str(out) in err and "not empty (README.md, data.csv)" in err and "--force" in err
    assert (out / "README.md").read_text() == "my notes" and not (out / "config.json").exists()
    assert export("--model", str(run), "--format", "hf", "--out", str(out), "--force") == 0
    assert (out / "README.md").read_text().startswith("---") and (out / "config.json").is_file()
    assert (out / "data.csv").read_text() == "1,2"  # not one of the export's files: left alone


@pytest.mark.parametrize("where", ["the run", "the run holding the checkpoint"])
def test_hf_never_writes_into_its_own_input(run, where, capsys):
    model = run if where == "the run" else run / "checkpoints" / "step_000001"
    assert model.is_dir()
    config_before = (run / "config.json").read_bytes()
    assert export("--model", str(model), "--format", "hf", "--out", str(run), "--force") == 2
    assert "is the model being exported" in one_line_error(capsys)
    assert (run / "config.json").read_bytes() == config_before and not (run / "model.safetensors").exists()


# ----------------------------------------------------------------------------- file modes


@pytest.mark.parametrize("umask,expected", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_take_the_umask_mode(run, tmp_path, umask, expected):
    before = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "report.json", {"ok": True})
        assert export("--model", str(run), "--format", "gguf", "--out", str(tmp_path / "m.gguf")) == 0
        assert export("--model", str(run), "--format", "hf", "--out", str(tmp_path / "hf")) == 0
    finally:
        os.umask(before)
    assert mode(tmp_path / "report.json") == expected
    assert mode(tmp_path / "m.gguf") == expected
    assert {p.name: mode(p) for p in (tmp_path / "hf").iterdir()} == {
        p.name: expected for p in (tmp_path / "hf").iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.gguf", "report.json"]  # no temporary left
