"""The energy meter: the proxy's arithmetic, RAPL on a fake sysfs tree (wrap-around too),
NVML through a fake binding (counter and sampling), and a clean fallback without NVML."""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path

import pytest

from optlab.core.models import load_model
from optlab.early_exit.energy import EnergyMeter
from optlab.errors import OptlabError


def test_the_proxy_counts_block_and_head_flops() -> None:
    # tiny:llama: q 64x64, k and v 64x32, o 64x64, gate/up 64x128, down 128x64, 2 norms of
    # 64 -> 36992 parameters a block; the head 320 x 64 = 20480. FLOPs = 2 x parameters.
    meter = EnergyMeter("proxy", model=load_model("tiny:llama").model)
    with meter:
        meter.count(layers=20)
        meter.count(layers=10, heads=15)
        time.sleep(0.01)
    result = meter.result
    assert (result.backend, result.joules, result.layer_tokens, result.head_calls) == (
        "proxy", None, 30, 15)  # fmt: skip
    assert result.flops == 30 * 2 * 36992 + 15 * 2 * 20480
    assert result.seconds >= 0.01


def _zone(root: Path, name: str, energy: int, wrap: int, label: str) -> Path:
    zone = root / name
    zone.mkdir()
    (zone / "energy_uj").write_text(f"{energy}\n")
    (zone / "max_energy_range_uj").write_text(f"{wrap}\n")
    (zone / "name").write_text(f"{label}\n")
    return zone


def test_rapl_sums_the_packages_and_unwraps_a_counter(tmp_path) -> None:
    wrap = 262_143_328_850
    first = _zone(tmp_path, "intel-rapl:0", 1_000_000, wrap, "package-0")
    second = _zone(tmp_path, "intel-rapl:1", wrap - 500_000, wrap, "package-1")
    core = _zone(tmp_path, "intel-rapl:0:0", 0, wrap, "core")  # inside package-0: not added
    meter = EnergyMeter("auto", rapl_root=tmp_path)
    assert meter.name == "rapl"
    with meter:
        (first / "energy_uj").write_text("3500000\n")  # +2.5 J
        (second / "energy_uj").write_text("1500000\n")  # wrapped: +0.5 J + 1.5 J
        (core / "energy_uj").write_text("9000000000\n")
    assert meter.result.joules == pytest.approx(4.5)
    assert meter.result.detail == "package-0, package-1"


def test_without_nvml_auto_falls_back_and_nvml_says_why(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    assert EnergyMeter("auto", rapl_root=tmp_path).name == "proxy"  # no RAPL zones either
    with pytest.raises(OptlabError, match="NVML is not available"):
        EnergyMeter("nvml")
    with pytest.raises(OptlabError, match="no readable RAPL"):
        EnergyMeter("rapl", rapl_root=tmp_path)
    with pytest.raises(OptlabError, match="choose one of"):
        EnergyMeter("zeus")


def _fake_nvml(counter: bool) -> types.ModuleType:
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    state = {"mj": 10_000}

    def energy(handle: int) -> int:
        if not counter:
            raise NVMLError("not supported")
        state["mj"] += 1500  # each read: 1.5 J more
        return state["mj"]

    nvml.NVMLError = NVMLError
    nvml.nvmlInit = lambda: None
    nvml.nvmlDeviceGetCount = lambda: 2
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i
    nvml.nvmlDeviceGetTotalEnergyConsumption = energy
    nvml.nvmlDeviceGetPowerUsage = lambda handle: 50_000  # mW: 50 W a GPU
    return nvml


def test_nvml_reads_the_energy_counter(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(counter=True))
    meter = EnergyMeter("nvml", devices=[1])
    with meter:
        pass
    # GPU 1 only; its probe read at setup, then start and stop: 1.5 J apart.
    assert (meter.result.backend, meter.result.joules) == ("nvml", pytest.approx(1.5))
    assert meter.result.detail == "1 GPU(s), total energy counter"


def test_nvml_integrates_sampled_power_without_a_counter(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(counter=False))
    meter = EnergyMeter("nvml", interval=0.005)
    with meter:
        time.sleep(0.1)
    # Two GPUs at 50 W each over the window (the sampler starts a moment after the clock).
    assert meter.result.joules == pytest.approx(100.0 * meter.result.seconds, rel=0.2)
    assert meter.result.detail == "2 GPU(s), power sampled"
