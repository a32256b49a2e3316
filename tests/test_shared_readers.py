"""The one-of-each helpers other modules lean on: device names, durations, documents.jsonl,
JSON files, the checkpoint listing and the curation flags of the CLI."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from simone.cli import build_config, build_parser
from simone.data.documents import numbered_documents, read_documents, write_documents
from simone.devices import pick_device
from simone.monitor.runs import checkpoint_rows as monitor_checkpoints
from simone.rundir import list_checkpoints, read_json, read_pointer
from simone.units import format_duration


def test_pick_device_auto_follows_the_machine_and_names_pass_through(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("simone.devices.mps_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    monkeypatch.setattr("simone.devices.mps_available", lambda: True)
    assert pick_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto") == torch.device("cuda")
    assert pick_device("auto", local_rank=3) == torch.device("cuda", 1)  # this rank's GPU
    assert pick_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert pick_device("cuda:0", local_rank=1) == torch.device("cuda", 0)  # an explicit index wins
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (42.4, "42s"), (75, "1m 15s"), (3600, "1h 00m"), (3 * 3600 + 5 * 60 + 9, "3h 05m"),
    (2 * 86400 + 3 * 3600, "2d 3h"), (-5, "0s"), (None, "–"), (float("nan"), "–"), (float("inf"), "–"),
])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_format_duration_names_the_unknown_its_caller_wants():
    assert format_duration(None, "unknown") == "unknown"


def test_documents_round_trip_filter_by_split_and_name_a_bad_line(tmp_path):
    docs = [{"id": "a", "split": "train", "text": "één"}, {"id": "b", "split": "val", "text": "x"}]
    path = tmp_path / "documents.jsonl"
    write_documents(path, docs)
    assert "één" in path.read_text(encoding="utf-8")  # UTF-8 kept as is
    assert list(read_documents(path)) == docs
    assert [d["id"] for d in read_documents(path, "val")] == ["b"]
    path.write_text(path.read_text(encoding="utf-8") + "\n{not json\n", encoding="utf-8")
    assert [n for n, _ in itertools.islice(numbered_documents(path), 2)] == [1, 2]
    with pytest.raises(ValueError, match=r"documents\.jsonl:4: not valid JSON"):
        list(read_documents(path))


def test_read_json_gives_the_default_for_missing_broken_and_hostile_files(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('{"a": 1}')
    assert read_json(good) == {"a": 1}
    assert read_json(tmp_path / "missing.json", {}) == {}
    (tmp_path / "half.json").write_text('{"a": ')
    assert read_json(tmp_path / "half.json") is None
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    assert read_json(tmp_path / "deep.json", "deep") == "deep"
    (tmp_path / "bytes.json").write_bytes(b'"\xff"')
    assert read_json(tmp_path / "bytes.json") is None
    assert read_json(tmp_path) is None  # a directory


def test_checkpoint_listing_is_shared_by_the_checkpoint_module_and_the_monitor(tmp_path):
    ck = tmp_path / "run" / "checkpoints"
    for name in ("step_000010", "step_000002", "step_x", "notes"):
        (ck / name).mkdir(parents=True)
    (ck / "step_000010" / "MANIFEST.json").write_text(json.dumps({"val_loss": 1.5}))
    (ck / "latest").write_text("step_000010\n")
    (ck / "best").write_text("../elsewhere\n")
    assert [p.name for p in list_checkpoints(ck)] == ["step_000002", "step_000010"]
    assert read_pointer(ck, "latest") == "step_000010" and read_pointer(ck, "best") is None
    assert list_checkpoints(tmp_path / "none") == []
    rows = monitor_checkpoints(tmp_path / "run")
    assert [(r["name"], r["step"], r["complete"], r["latest"], r["best"], r["val_loss"]) for r in rows] == [
        ("step_000010", 10, True, True, False, 1.5), ("step_000002", 2, False, False, False, None)]


@pytest.mark.parametrize("verb", ["run", "curate", "prepare"])
def test_curation_flags_reach_the_config_from_every_verb_that_curates(verb):
    parser = build_parser()
    args = parser.parse_args([verb, "--preset", "tiny", "--strict", "--decontaminate", "--no-curate"])
    cfg = build_config(args)
    assert cfg.curate.strict and cfg.curate.decontaminate and not cfg.curate.enabled
    plain = build_config(parser.parse_args([verb, "--preset", "tiny"]))
    assert not plain.curate.strict and not plain.curate.decontaminate and plain.curate.enabled
