"""CPU, memory and GPU use sampled on a background thread and logged as `system/*` metrics, the names MLflow's
System metrics tab shows. Samples go through the tracker like any metric, so they wait out a server outage too
(MLflow's own monitor stops for good at the first failed request)."""

from __future__ import annotations

import threading
from collections.abc import Callable

PREFIX = "system/"


def sample() -> dict[str, float]:
    """One reading of this machine: CPU %, memory used, and per GPU its memory used (and utilisation where NVML is
    available)."""
    import psutil

    memory = psutil.virtual_memory()
    out = {f"{PREFIX}cpu_utilization_percentage": psutil.cpu_percent(),
           f"{PREFIX}system_memory_usage_megabytes": memory.used / 2**20,
           f"{PREFIX}system_memory_usage_percentage": memory.percent}
    import torch

    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            out[f"{PREFIX}gpu_{index}_memory_usage_megabytes"] = (total - free) / 2**20
            out[f"{PREFIX}gpu_{index}_memory_usage_percentage"] = 100 * (total - free) / total
            try:
                out[f"{PREFIX}gpu_{index}_utilization_percentage"] = float(torch.cuda.utilization(index))
            except Exception:  # needs NVML (pynvml); memory is still worth logging without it
                pass
    return out


class SystemSampler:
    """Calls `log(metrics, step)` every `interval_s` seconds, steps counting from `first_step`, until `stop()`."""

    def __init__(self, log: Callable[[dict[str, float], int], None], interval_s: float, first_step: int = 0) -> None:
        self.log, self.interval_s, self.step = log, interval_s, first_step
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sd3ray-system-metrics", daemon=True)

    def start(self) -> SystemSampler:
        import psutil

        psutil.cpu_percent()  # the first reading of CPU use is relative to this call
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.log(sample(), self.step)
            self.step += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)
