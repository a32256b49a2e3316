"""The trainer's `kind=system` sampler: psutil always, NVML when present, never an error."""

from __future__ import annotations

import types

import pytest

from simone.train import system_stats
from simone.train.system_stats import SystemSampler, system_snapshot

FIELDS = {"cpu_percent", "ram_used_gb", "ram_total_gb", "rss_gb", "disk_free_gb", "gpus"}


def test_snapshot_has_the_contract_fields(tmp_path) -> None:
    snap = system_snapshot(tmp_path)
    assert set(snap) == FIELDS
    assert 0 <= snap["cpu_percent"] <= 100 * 256
    assert 0 < snap["ram_used_gb"] <= snap["ram_total_gb"]
    assert 0 < snap["rss_gb"] < snap["ram_total_gb"]
    assert snap["disk_free_gb"] > 0
    assert isinstance(snap["gpus"], list)


def test_no_nvml_means_no_gpus_not_an_error(monkeypatch) -> None:
    monkeypatch.setattr(system_stats, "_nvml", lambda: None)
    with SystemSampler() as s:
        assert s.snapshot()["gpus"] == []


class FakeNVML(types.SimpleNamespace):
    NVML_TEMPERATURE_GPU = 0

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H200"

    def nvmlDeviceGetUtilizationRates(self, h):
        return types.SimpleNamespace(gpu=97)

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(used=60 * 1024**3, total=141 * 1024**3)

    def nvmlDeviceGetTemperature(self, h, kind):
        return 64

    def nvmlDeviceGetPowerUsage(self, h):
        if h == 1:
            raise RuntimeError("not supported")
        return 612_500  # milliwatts

    def nvmlShutdown(self):
        self.closed = True


def test_gpu_fields_from_nvml_and_unsupported_queries_become_none(monkeypatch) -> None:
    fake = FakeNVML()
    monkeypatch.setattr(system_stats, "_nvml", lambda: fake)
    with SystemSampler() as s:
        gpus = s.snapshot()["gpus"]
    assert gpus[0] == {"index": 0, "name": "NVIDIA H200", "util": 97.0, "mem_used_gb": 60.0,
                       "mem_total_gb": 141.0, "temp_c": 64.0, "power_w": 612.5}
    assert gpus[1]["power_w"] is None and gpus[1]["util"] == 97.0
    assert fake.closed


def test_real_nvml_on_this_machine_does_not_raise() -> None:
    pytest.importorskip("pynvml")
    with SystemSampler() as s:
        for g in s.snapshot()["gpus"]:  # empty without a GPU; filled on a GPU machine
            assert g["mem_total_gb"] is None or g["mem_total_gb"] > 0
