"""Packages from elsewhere: extracted safely into a temporary folder that is removed again,
nothing looked up outside the package, and packaging that never replaces or writes a run."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from simone.inference.generate import sample_text
from simone.inference.load import ModelLoadError, load_model
from simone.inference.package import package_run
from simone.rundir import RunDir
from simone.train.trainer import train
from simone.inference.validation_report import validate
from train_support import new_run, subprocess_env


@pytest.fixture(scope="module")
def trained(template, tmp_path_factory) -> RunDir:
    """A run trained for two steps (enough to package and load)."""
    cfg, run = new_run(template, tmp_path_factory.mktemp("pkg") / "run", max_steps=2, eval_every=100)
    train(cfg, run)
    return run


@pytest.fixture(scope="module")
def package(trained, tmp_path_factory) -> Path:
    return package_run(trained, tmp_path_factory.mktemp("pkgs"))


@pytest.fixture
def tmpdir_for_packages(tmp_path, monkeypatch) -> Path:
    """Point temporary folders (of this process and of subprocesses) at a fresh test folder."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def leftovers(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.glob("simone-pkg-*"))


def rebuild(package: Path, dest: Path, edit) -> Path:
    """A copy of `package` with its members changed by `edit(dict name -> bytes)`."""
    with tarfile.open(package) as tar:
        files = {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar if m.isfile()}
    edit(files)
    with tarfile.open(dest, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"pkg/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dest


# ----------------------------------------------------------------------------- temporary folders


def test_loading_a_package_leaves_no_temporary_folder(package, tmpdir_for_packages):
    with load_model(package) as loaded:
        assert leftovers(tmpdir_for_packages)  # extracted while in use
        assert sample_text(loaded, "The ", max_tokens=3)
    assert leftovers(tmpdir_for_packages) == []
    loaded = load_model(package, device="cpu")
    del loaded  # without close(): removed when the object goes
    assert leftovers(tmpdir_for_packages) == []
    report = validate(package, out_dir=tmpdir_for_packages.parent / "report")
    assert report["ok"], report["failed"]
    assert leftovers(tmpdir_for_packages) == []


def test_generate_and_validate_commands_leave_no_temporary_folder(package, tmpdir_for_packages):
    for args in (["generate", "--model", str(package), "--max-tokens", "3", "--device", "cpu"],
                 ["validate", "--model", str(package), "--out", str(tmpdir_for_packages.parent / "v")]):
        done = subprocess.run([sys.executable, "-m", "simone", *args], capture_output=True, text=True,
                              timeout=120, env=subprocess_env(TMPDIR=str(tmpdir_for_packages)))
        assert done.returncode == 0, done.stderr
        assert leftovers(tmpdir_for_packages) == [], args[0]


def test_a_package_that_fails_to_load_leaves_no_temporary_folder(package, tmpdir_for_packages):
    def bad_config(files):
        config = json.loads(files["config.json"])
        config["model"]["n_layers"] = 10**8  # range-checked before anything is built
        files["config.json"] = json.dumps(config).encode()
        manifest = json.loads(files["MANIFEST.json"])
        manifest["files"]["config.json"] = {"sha256": hashlib.sha256(files["config.json"]).hexdigest(),
                                            "size": len(files["config.json"])}
        files["MANIFEST.json"] = json.dumps(manifest).encode()

    bad = rebuild(package, tmpdir_for_packages.parent / "bad.tar.gz", bad_config)
    with pytest.raises(Exception, match=r"model.n_layers=100000000: out of range"):
        load_model(bad)
    assert leftovers(tmpdir_for_packages) == []


# ----------------------------------------------------------------------------- hostile archives


def _tar_with(dest: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return dest


def _member(name: str, data: bytes = b"{}", **kw) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    return info, data


def test_a_tar_bomb_with_many_members_is_refused_with_one_line(tmp_path, tmpdir_for_packages, capsys):
    from simone.cli import main

    bomb = _tar_with(tmp_path / "many.tar.gz", [_member(f"pkg/f{i}") for i in range(5000)])
    assert main(["generate", "--model", str(bomb)]) == 2
    err = capsys.readouterr().err.strip()
    assert "more than 64 members" in err and "\n" not in err
    assert leftovers(tmpdir_for_packages) == []


@pytest.mark.parametrize("name, size", [("model.safetensors", 300 << 30), ("junk.bin", 300 << 30),
                                        ("config.json", 1 << 30)])
def test_a_member_declaring_a_huge_size_is_refused_before_it_is_read(tmp_path, tmpdir_for_packages, name, size):
    info = tarfile.TarInfo(f"pkg/{name}")
    info.size = size  # 300 GiB of zeros would compress to almost nothing
    with open(tmp_path / "huge.tar", "wb") as f:
        f.write(info.tobuf(format=tarfile.PAX_FORMAT))
        f.write(b"\0" * (1 << 20))  # what follows is never read
    raw = (tmp_path / "huge.tar").read_bytes()
    import gzip

    (tmp_path / "huge.tar.gz").write_bytes(gzip.compress(raw))
    with pytest.raises(ModelLoadError, match=rf"{name}' declares {size:,} bytes, more than"):
        load_model(tmp_path / "huge.tar.gz")
    assert leftovers(tmpdir_for_packages) == []


@pytest.mark.parametrize("member, message", [
    (_member("pkg/model.safetensors", b"", type=tarfile.SYMTYPE, linkname="/etc/passwd"), "not a regular file"),
    (_member("pkg/config.json", b"", type=tarfile.LNKTYPE, linkname="pkg/tokenizer.json"), "not a regular file"),
    (_member("pkg/tokenizer.json", b"", type=tarfile.CHRTYPE), "not a regular file"),
    (_member("/tmp/evil.json"), "unsafe or unexpected path"),
    (_member("pkg/../../evil.json"), "unsafe or unexpected path"),
    (_member("pkg/sub/config.json"), "unsafe or unexpected path"),
    (_member("other/config.json"), "outside the package folder"),
])
def test_links_devices_and_paths_outside_the_package_are_refused(tmp_path, tmpdir_for_packages, member, message):
    pkg = _tar_with(tmp_path / "evil.tar.gz", [_member("pkg/README.md", b"hi"), member])
    with pytest.raises(ModelLoadError, match=message):
        load_model(pkg)
    assert leftovers(tmpdir_for_packages) == []
    assert not Path("/tmp/evil.json").exists()


# ----------------------------------------------------------------------------- nothing from outside


def test_a_package_never_uses_a_tokenizer_or_shards_planted_beside_it(package, trained, tmpdir_for_packages):
    # what the old layout (TMP/simone-pkg-*/NAME/) found at parent.parent
    planted = tmpdir_for_packages / "tokenizer"
    planted.mkdir()
    shutil.copy(trained.tokenizer, planted / "tokenizer.json")
    shutil.copytree(trained.data, tmpdir_for_packages / "data")
    no_tokenizer = rebuild(package, tmpdir_for_packages.parent / "no_tok.tar.gz", lambda f: f.pop("tokenizer.json"))
    with pytest.raises(ModelLoadError, match=r"tokenizer.json: missing \(tokenizer\)"):
        load_model(no_tokenizer)
    report = validate(package, out_dir=tmpdir_for_packages.parent / "report")
    check = {c["name"]: c for c in report["checks"]}["validation_loss"]
    assert check["detail"].startswith("skipped"), check


def test_loading_a_run_checks_the_tokenizer_recorded_in_its_checkpoint(trained, tmp_path):
    run = RunDir(shutil.copytree(trained.root, tmp_path / "run"))
    manifest = json.loads(next(run.checkpoints.glob("step_*/MANIFEST.json")).read_text())
    assert manifest["tokenizer_sha256"] == hashlib.sha256(run.tokenizer.read_bytes()).hexdigest()
    with run.tokenizer.open("a") as f:
        f.write(" ")  # a retrained or replaced tokenizer
    with pytest.raises(ModelLoadError, match=r"trained with tokenizer sha256 .* but .*tokenizer.json has sha256"):
        load_model(run.root)


# ----------------------------------------------------------------------------- packaging


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()
                                       if p.is_file() else "")
            for p in sorted(root.rglob("*"))}


def test_packaging_never_replaces_a_package_and_never_writes_the_run(trained, template, tmp_path):
    before = _snapshot(trained.root)
    out = tmp_path / "out"
    first = package_run(trained, out)
    assert _snapshot(trained.root) == before  # works on a read-only run directory
    manifest = json.loads(next(trained.checkpoints.glob("step_*/MANIFEST.json")).read_text())
    step, sha = manifest["step"], manifest["files"]["model.safetensors"]["sha256"][:8]
    assert first.name == f"simone-tiny-llama-run-step{step}-{sha}.tar.gz"
    first_bytes = first.read_bytes()
    second = package_run(trained, out)
    assert second != first and second.name.endswith("-2.tar.gz")
    assert first.read_bytes() == first_bytes
    # another run with the same basename (other weights) gets its own name
    cfg, other = new_run(template, tmp_path / "elsewhere" / "run", max_steps=1, eval_every=100)
    train(cfg, other)
    third = package_run(other, out)
    assert third.name.startswith("simone-tiny-llama-run-step1-") and third not in (first, second)
    assert first.read_bytes() == first_bytes and len(list(out.glob("*.tar.gz"))) == 3


def test_a_package_unpacks_readable_by_other_accounts(trained, tmp_path):
    old = os.umask(0o077)  # a careful packer: every file it writes is 0600
    try:
        package = package_run(trained, tmp_path / "pkgs")
    finally:
        os.umask(old)
    """Every member is stored 0644 (files) or 0755 (folders), whatever the umask it was packed
    under: a package opened by a service account on another machine must be readable."""
    with tarfile.open(package) as tar:
        modes = {m.name: m.mode & 0o777 for m in tar.getmembers()}
        kinds = {m.name: m.isdir() for m in tar.getmembers()}
    assert any(name.endswith("model.safetensors") for name in modes)
    wrong = {name: oct(mode) for name, mode in modes.items() if mode != (0o755 if kinds[name] else 0o644)}
    assert not wrong
