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
from simone.train.checkpoint import (
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
from simone.train.faults import Faults


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
    from simone.train.checkpoint import validate_checkpoint

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
