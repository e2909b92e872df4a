"""The --cpu-table option's reading of /proc/stat: CPU this process burns shows up as the machine's busy time."""

import time

from tests.cpu_table import _cpu_seconds


def test_cpu_burnt_here_counts_as_busy_and_not_as_idle() -> None:
    busy_before, idle_before, steal_before = _cpu_seconds()
    burnt_from = time.process_time()
    while time.process_time() - burnt_from < 0.5:  # 0.5 s of this process's own CPU, however long that takes
        pass
    busy_after, idle_after, steal_after = _cpu_seconds()
    assert busy_after - busy_before >= 0.45  # clock ticks are 10 ms; other processes only add to it
    assert idle_after >= idle_before and steal_after >= steal_before
