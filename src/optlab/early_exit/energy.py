"""An energy meter with backends, one object every early-exit report measures with.

Backends, best first (``auto`` takes the first that works here; NVML only for a model on
a GPU):

- ``nvml``: NVIDIA GPUs through nvidia-ml-py (``pynvml``, NVIDIA's own binding; the one
  Zeus builds on). The driver's total-energy counter (mJ, Volta and newer) read before and
  after; where a GPU lacks it, its power draw sampled in a thread and integrated.
- ``rapl``: Intel RAPL package counters under ``/sys/class/powercap`` (``intel-rapl:N``,
  micro-joules), where this user may read them (often root only); a counter that passed its
  ``max_energy_range_uj`` during the window is unwrapped.
- ``proxy``: no joules. Wall seconds and the FLOPs of what ran: the caller reports executed
  layers x tokens (and LM-head evaluations) with :meth:`EnergyMeter.count`, each costing
  2 x the parameters of one decoder block (the head: 2 x its parameters). The attention
  scores over the context (4 x context x hidden per layer and token) are left out: they are
  the same for every exit policy at a given context, and small at 15-token completions.

Every :class:`Measurement` names its backend and always holds seconds and, given a model,
the FLOPs proxy too, so a report can set any two runs side by side.

>>> meter = EnergyMeter("proxy", model=lm.model)
>>> with meter:
...     meter.count(layers=30 * 15)     # 15 tokens through all 30 layers
>>> meter.result.backend, meter.result.flops == 450 * meter.layer_flops
('proxy', True)
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from torch import nn

from optlab.core.anatomy import Anatomy
from optlab.errors import OptlabError

BACKENDS = ("auto", "nvml", "rapl", "proxy")
RAPL_ROOT = Path("/sys/class/powercap")


@dataclass(frozen=True)
class Measurement:
    """What one window of work cost; ``joules`` is None under the proxy."""

    backend: str
    seconds: float
    joules: float | None
    layer_tokens: int
    head_calls: int
    flops: float | None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Nvml:
    """GPU energy of the given device indices (all visible GPUs by default)."""

    name = "nvml"

    def __init__(self, devices: list[int] | None, interval: float) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except Exception as err:  # no library, no driver, no GPU: another backend measures
            raise OptlabError(f"NVML is not available here ({type(err).__name__})") from None
        if count == 0:
            raise OptlabError("NVML sees no GPU")
        self.nvml, self.interval = pynvml, interval
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in devices or range(count)]
        try:
            for handle in self.handles:
                pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            self.counter = True
        except pynvml.NVMLError:  # older GPUs: no energy counter, sample the power instead
            self.counter = False
        self.detail = (f"{len(self.handles)} GPU(s), "
                       + ("total energy counter" if self.counter else "power sampled"))  # fmt: skip

    def start(self) -> None:
        if self.counter:
            self.begin = [self.nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles]
            return
        self.joules, self.stop_event = 0.0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        last_time, last_watts = time.perf_counter(), self._watts()
        while not self.stop_event.wait(self.interval):
            now, watts = time.perf_counter(), self._watts()
            self.joules += (now - last_time) * (watts + last_watts) / 2  # trapezoid rule
            last_time, last_watts = now, watts
        now, watts = time.perf_counter(), self._watts()
        self.joules += (now - last_time) * (watts + last_watts) / 2

    def _watts(self) -> float:
        return sum(self.nvml.nvmlDeviceGetPowerUsage(h) for h in self.handles) / 1000.0

    def stop(self) -> float:
        if self.counter:
            end = [self.nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles]
            return sum(e - b for b, e in zip(self.begin, end, strict=True)) / 1000.0
        self.stop_event.set()
        self.thread.join()
        return self.joules


class _Rapl:
    """CPU package energy from the RAPL counters this user can read."""

    name = "rapl"

    def __init__(self, root: Path) -> None:
        # Top-level zones only (intel-rapl:0, :1 = the packages); their subzones (cores,
        # uncore, dram) are inside the package figure, so adding them would count twice.
        zones = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1)
        self.zones = [z for z in zones if os.access(z / "energy_uj", os.R_OK)]
        if not self.zones:
            raise OptlabError(f"no readable RAPL counter under {root} (often root only)")
        try:
            self.ranges = [int((z / "max_energy_range_uj").read_text()) for z in self.zones]
            self._read()
        except (OSError, ValueError) as err:
            raise OptlabError(f"RAPL counters under {root} cannot be read: {err}") from None
        self.detail = ", ".join((z / "name").read_text().strip() if (z / "name").is_file()
                                else z.name for z in self.zones)  # fmt: skip

    def _read(self) -> list[int]:
        return [int((z / "energy_uj").read_text()) for z in self.zones]

    def start(self) -> None:
        self.begin = self._read()

    def stop(self) -> float:
        total = 0
        for begin, end, wrap in zip(self.begin, self._read(), self.ranges, strict=True):
            total += end - begin if end >= begin else end + wrap - begin  # wrapped once
        return total / 1e6


@dataclass
class EnergyMeter:
    """``with meter:`` measures the work inside; ``meter.result`` is its
    :class:`Measurement`. ``model`` gives the FLOPs per layer and head call of the proxy."""

    backend: str = "auto"
    model: nn.Module | None = None
    devices: list[int] | None = None  # NVML device indices (default: every visible GPU)
    rapl_root: Path = RAPL_ROOT
    interval: float = 0.01  # seconds between power samples (GPUs without a counter)
    result: Measurement | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise OptlabError(f"--energy {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        self._device = self._pick()
        self.layer_flops = self.head_flops = 0.0
        if self.model is not None:
            anatomy = Anatomy.of(self.model)
            self.layer_flops = 2.0 * sum(p.numel() for p in anatomy.blocks[0].parameters())
            self.head_flops = 2.0 * sum(p.numel() for p in anatomy.lm_head.parameters())
        self._layers = self._heads = 0

    def _pick(self) -> _Nvml | _Rapl | None:
        wanted = ("nvml", "rapl") if self.backend == "auto" else (self.backend,)
        if self.backend == "auto" and self.model is not None:  # GPU energy of a CPU model: no
            on_gpu = next(self.model.parameters()).device.type == "cuda"
            wanted = wanted if on_gpu else ("rapl",)
        for name in wanted:
            if name == "proxy":
                return None
            try:
                return _Nvml(self.devices, self.interval) if name == "nvml" else _Rapl(
                    Path(self.rapl_root))  # fmt: skip
            except OptlabError:
                if self.backend != "auto":
                    raise
        return None  # auto: neither measures here, so the proxy does

    @property
    def name(self) -> str:
        """The backend that measures (``auto`` resolved)."""
        return "proxy" if self._device is None else self._device.name

    def count(self, layers: int, heads: int = 0) -> None:
        """Report executed decoder layers x tokens (and LM-head evaluations) in the window."""
        self._layers += int(layers)
        self._heads += int(heads)

    def __enter__(self) -> EnergyMeter:
        self._layers = self._heads = 0
        if self._device is not None:
            self._device.start()
        self._start = time.perf_counter()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        joules = None if self._device is None else self._device.stop()
        seconds = time.perf_counter() - self._start  # the window holds the device's
        flops = (self._layers * self.layer_flops + self._heads * self.head_flops
                 if self.model is not None else None)  # fmt: skip
        detail = "" if self._device is None else self._device.detail
        self.result = Measurement(self.name, seconds, joules, self._layers, self._heads, flops,
                                  detail)  # fmt: skip
