"""Checkpoints: atomic save with a verified manifest, safe loading, fallback past damaged
checkpoints, pruning, disk-full handling and clear shape errors."""

from __future__ import annotations

import argparse
import json
import pickle

import pytest
import torch
from safetensors.torch import load_model as safetensors_load_model

from simone.config import preset
from simone.model import build_model
from simone.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointSaveError,
    check_state_fits,
    list_checkpoints,
    load_checkpoint,
    read_pointer,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from simone.faults import Faults


@pytest.fixture(scope="module")
def model():
    cfg = preset("tiny")
    torch.manual_seed(0)
    return cfg, build_model(cfg.model)


def _state(step: int) -> dict:
    return {"step": step, "optimizer": {"state": {0: {"exp_avg": torch.ones(3) * step}}, "param_groups": []},
            "rng": {"torch": torch.get_rng_state()}, "loader": {"epoch": 1, "position": step},
            "nested": [1, 2.5, "x", None, (3, 4)]}


def _save(root, step, model, cfg, **kw):
    return save_checkpoint(root, step, model.state_dict(), _state(step), cfg.to_dict(), **kw)


def test_round_trip_restores_weights_state_and_config(tmp_path, model):
    cfg, m = model
    path = _save(tmp_path / "checkpoints", 7, m, cfg)
    assert path.name == "step_000007"
    assert read_pointer(tmp_path / "checkpoints", "latest") == "step_000007"
    manifest = json.loads((path / "MANIFEST.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "state.pt", "config.json"}
    for name, entry in manifest["files"].items():
        assert (path / name).stat().st_size == entry["size"] and len(entry["sha256"]) == 64

    weights, state, config = load_checkpoint(path)
    for k, v in m.state_dict().items():
        assert torch.equal(weights[k], v), k
    assert state["step"] == 7 and state["loader"] == {"epoch": 1, "position": 7}
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], torch.full((3,), 7.0))
    assert state["nested"] == [1, 2.5, "x", None, (3, 4)]
    assert config == cfg.to_dict()
    # tied embeddings are stored once and restored under both names
    if m.output.weight is m.tok_embeddings.weight:
        keys = set(__import__("safetensors").safe_open(str(path / "model.safetensors"), "pt").keys())
        assert len(keys) == len(m.state_dict()) - 1
    # weights load into a fresh model with plain safetensors too (what generate/package use)
    fresh = build_model(cfg.model)
    missing, unexpected = safetensors_load_model(fresh, str(path / "model.safetensors"), strict=False)
    assert not missing and not unexpected
    assert torch.equal(fresh.output.weight, m.output.weight)


def test_state_file_is_loadable_without_unpickling_code(tmp_path, model):
    cfg, m = model
    path = _save(tmp_path / "c", 1, m, cfg)
    torch.load(path / "state.pt", weights_only=True)  # must not raise
    # a state file that needs arbitrary unpickling is refused, naming the file
    (path / "state.pt").write_bytes(pickle.dumps({"not_plain_data": argparse.Namespace(x=1)}, protocol=2))
    with pytest.raises(CheckpointError, match="state.pt"):
        load_checkpoint(path, verify=False)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_latest_is_reported_and_previous_used(tmp_path, model, damage):
    cfg, m = model
    root = tmp_path / "checkpoints"
    _save(root, 10, m, cfg)
    newest = _save(root, 20, m, cfg)
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        weights.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0x01
        weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="step_000020/model.safetensors: (truncated|corrupted)"):
        verify_checkpoint(newest)
    problems: list[str] = []
    chosen = resolve_checkpoint(tmp_path, "latest", on_problem=problems.append)
    assert chosen.name == "step_000010"
    assert len(problems) == 1 and "step_000020" in problems[0]
    load_checkpoint(chosen)  # the previous one is intact


def test_incomplete_directory_without_manifest_is_skipped(tmp_path, model):
    cfg, m = model
    root = tmp_path / "checkpoints"
    _save(root, 10, m, cfg)
    newest = _save(root, 20, m, cfg)
    (newest / "MANIFEST.json").unlink()
    with pytest.warns(UserWarning, match="no MANIFEST"):
        assert resolve_checkpoint(root, "latest").name == "step_000010"


def test_keeps_last_k_plus_best(tmp_path, model):
    cfg, m = model
    root = tmp_path / "checkpoints"
    _save(root, 1, m, cfg, best=True)
    for step in range(2, 7):
        _save(root, step, m, cfg, keep=2)
    names = [p.name for p in list_checkpoints(root)]
    assert names == ["step_000001", "step_000005", "step_000006"]
    assert read_pointer(root, "best") == "step_000001"
    assert resolve_checkpoint(root, "best").name == "step_000001"
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]


def test_disk_full_during_save_leaves_previous_checkpoint(tmp_path, model):
    cfg, m = model
    root = tmp_path / "checkpoints"
    _save(root, 10, m, cfg)
    with pytest.raises(CheckpointSaveError, match="disk full"):
        _save(root, 20, m, cfg, faults=Faults(enospc_from_step=20))
    assert [p.name for p in list_checkpoints(root)] == ["step_000010"]
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert read_pointer(root, "latest") == "step_000010"
    load_checkpoint(resolve_checkpoint(root, "latest"))


def test_leftover_temporary_from_a_killed_save_is_ignored_and_cleaned(tmp_path, model):
    cfg, m = model
    root = tmp_path / "checkpoints"
    _save(root, 10, m, cfg)
    half = root / ".tmp-step_000020-123-456"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    assert resolve_checkpoint(root, "latest").name == "step_000010"
    _save(root, 20, m, cfg)
    assert not half.exists()


def test_shape_mismatch_names_the_tensor_and_shapes(tmp_path, model):
    cfg, m = model
    path = _save(tmp_path / "c", 1, m, cfg)
    weights, _, _ = load_checkpoint(path)
    other_cfg = preset("tiny")
    other_cfg.model.dim = 32
    other = build_model(other_cfg.model)
    with pytest.raises(CheckpointMismatchError, match=r"has shape \[\d+, 64\] but the config expects \[\d+, 32\]"):
        check_state_fits(other, weights, str(path / "model.safetensors"))
    check_state_fits(m, weights, "ok")  # the matching model passes


def test_invalid_config_in_checkpoint_is_rejected(tmp_path, model):
    cfg, m = model
    bad = cfg.to_dict()
    bad["model"]["no_such_field"] = 1
    path = save_checkpoint(tmp_path / "c", 1, m.state_dict(), {}, bad)
    with pytest.raises(CheckpointError, match="config.json: not a valid SIM-ONE config"):
        load_checkpoint(path)


def test_validate_checkpoint_checks_manifest_schema_and_shapes(tmp_path, model):
    from simone.inference.load import validate_checkpoint

    cfg, m = model
    path = _save(tmp_path / "c", 1, m, cfg)
    assert validate_checkpoint(path).model.dim == cfg.model.dim
    # config from elsewhere that no longer matches the weights
    d = json.loads((path / "config.json").read_text())
    d["model"]["n_layers"] = 3
    (path / "config.json").write_text(json.dumps(d))
    (path / "MANIFEST.json").unlink()  # a bare folder (e.g. an unpacked package) has none
    with pytest.raises(CheckpointMismatchError, match="missing tensors layers.2"):
        validate_checkpoint(path)


# ----------------------------------------------------------------------------- re-saving a step


class _Crash(BaseException):
    """A stand-in for kill -9: nothing in save_checkpoint catches it."""


class _CrashBetweenRenames(Faults):
    def between_renames(self, step: int) -> None:
        raise _Crash


class _CorruptNewCopy(Faults):
    """Flip a byte of the new copy's weights once it is written (a bad disk, a bad write)."""

    def __init__(self, root):
        super().__init__()
        self.root, self.calls = root, 0

    def slow_save(self) -> None:
        self.calls += 1
        if self.calls == 3:  # after the manifest, before anything old is touched
            weights = next(self.root.glob(".tmp-*/model.safetensors"))
            data = bytearray(weights.read_bytes())
            data[-5] ^= 0xFF
            weights.write_bytes(bytes(data))


def test_resaving_a_step_verifies_the_new_copy_before_the_old_one_goes(tmp_path, model):
    cfg, m = model
    root = tmp_path / "checkpoints"
    _save(root, 10, m, cfg)
    before = (root / "step_000010" / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointSaveError, match="step_000010"):
        _save(root, 10, m, cfg, faults=_CorruptNewCopy(root))
    verify_checkpoint(root / "step_000010")  # the old copy is in place and intact
    assert (root / "step_000010" / "model.safetensors").read_bytes() == before
    assert not [p for p in root.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_crash_between_the_renames_of_a_resave_leaves_a_loadable_latest(tmp_path, model):
    cfg, m = model
    root = tmp_path / "checkpoints"
    _save(root, 5, m, cfg)
    _save(root, 10, m, cfg)
    with pytest.raises(_Crash):
        _save(root, 10, m, cfg, faults=_CrashBetweenRenames())
    assert not (root / "step_000010").exists() and read_pointer(root, "latest") == "step_000010"
    problems: list[str] = []
    chosen = resolve_checkpoint(root, "latest", on_problem=problems.append)
    assert chosen.name.startswith(".old-step_000010-")  # not the older step_000005
    assert "interrupted save" in problems[0]
    _, state, _ = load_checkpoint(chosen)
    assert state["step"] == 10
    # the next save puts the copy back in place before anything else
    _save(root, 11, m, cfg)
    verify_checkpoint(root / "step_000010")
    assert not [p for p in root.iterdir() if p.name.startswith(".old-")]


def test_leftover_old_copy_is_dropped_when_the_step_is_intact(tmp_path, model):
    cfg, m = model
    root = tmp_path / "checkpoints"
    _save(root, 10, m, cfg)
    stale = root / ".old-step_000010-1-2"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert resolve_checkpoint(root, "latest").name == "step_000010"
    _save(root, 11, m, cfg)
    assert not stale.exists()


# ----------------------------------------------------------------------------- hostile manifests


def _rewrite_manifest(path, edit) -> None:
    manifest = json.loads((path / "MANIFEST.json").read_text())
    edit(manifest["files"])
    (path / "MANIFEST.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, message", [
    (lambda files: files.update({"/dev/zero": {"sha256": "0" * 64, "size": 0}}), "not a plain file name"),
    (lambda files: files.update({"../x": {"sha256": "0" * 64, "size": 0}}), "not a plain file name"),
    (lambda files: files.update({"state.pt": "not an object"}), "is not an object"),
    (lambda files: files.update({"state.pt": None}), "is not an object"),
])
def test_manifest_names_outside_the_checkpoint_are_refused_quickly(tmp_path, model, edit, message):
    import signal

    cfg, m = model
    root = tmp_path / "c"
    path = _save(root, 1, m, cfg)
    _save(root, 2, m, cfg)
    (root / "x").write_bytes(b"")  # what "../x" would name
    _rewrite_manifest(root / "step_000002", edit)

    def hang(*_):
        raise TimeoutError("verify_checkpoint hung")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(10)
    try:
        with pytest.raises(CheckpointError, match=message):
            verify_checkpoint(root / "step_000002")
        problems: list[str] = []
        assert resolve_checkpoint(root, "latest", on_problem=problems.append) == path  # falls back
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_manifest_entry_that_is_a_symlink_is_refused(tmp_path, model):
    cfg, m = model
    path = _save(tmp_path / "c", 1, m, cfg)
    (path / "link").symlink_to("/dev/zero")
    _rewrite_manifest(path, lambda files: files.update({"link": {"sha256": "0" * 64, "size": 0}}))
    with pytest.raises(CheckpointError, match="link: not a regular file"):
        verify_checkpoint(path)


# ----------------------------------------------------------------------------- tokenizer hash


def test_manifest_records_the_tokenizer_and_a_different_one_is_refused(tmp_path, model):
    from simone.checkpoint import check_tokenizer

    cfg, m = model
    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"version": "a"}')
    path = _save(tmp_path / "c", 1, m, cfg, tokenizer=tok)
    manifest = json.loads((path / "MANIFEST.json").read_text())
    import hashlib

    assert manifest["tokenizer_sha256"] == hashlib.sha256(tok.read_bytes()).hexdigest()
    check_tokenizer(path, tok)
    other = tmp_path / "other.json"
    other.write_text('{"version": "b"}')
    with pytest.raises(CheckpointError,
                       match=r"MANIFEST.json: trained with tokenizer sha256 [0-9a-f]{16}.*other.json has sha256"):
        check_tokenizer(path, other)


def test_kill_9_between_the_renames_of_a_resave(tmp_path):
    """The real thing: SIMONE_FAULT_KILL_BETWEEN_RENAMES kills the saving process."""
    import os
    import signal
    import subprocess
    import sys

    root = tmp_path / "checkpoints"
    code = ("import torch; from simone.config import preset; from simone.model import build_model; "
            "from simone.checkpoint import save_checkpoint; from simone.faults import Faults; "
            "cfg = preset('tiny'); m = build_model(cfg.model); "
            f"[save_checkpoint({str(root)!r}, 3, m.state_dict(), {{'step': 3}}, cfg.to_dict(), "
            "faults=Faults.from_env()) for _ in range(2)]")
    env = dict(os.environ, SIMONE_FAULT_KILL_BETWEEN_RENAMES="3")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert not (root / "step_000003").exists() and read_pointer(root, "latest") == "step_000003"
    chosen = resolve_checkpoint(root, "latest", on_problem=lambda msg: None)
    assert load_checkpoint(chosen)[1]["step"] == 3
