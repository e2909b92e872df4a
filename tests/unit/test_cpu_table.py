"""The --cpu-table option's reading of /proc/stat: CPU this process burns shows up as the machine's busy time, and
busy, idle and steal together account for every core's time, each tick counted once."""

import os
import time

from tests.cpu_table import _cpu_seconds


def test_cpu_burnt_here_counts_as_busy_and_the_three_parts_add_up_to_the_cores_time() -> None:
    before, started = _cpu_seconds(), time.monotonic()
    burnt_from = time.process_time()
    while time.process_time() - burnt_from < 0.5:  # 0.5 s of this process's own CPU, however long that takes
        pass
    after, wall_s = _cpu_seconds(), time.monotonic() - started
    busy, idle, steal = (b - a for a, b in zip(before, after))
    assert busy >= 0.45  # clock ticks are 10 ms; other processes only add to it
    assert idle >= 0 and steal >= 0
    # a field counted in two parts (idle as busy, say) would exceed the cores' time; one left out would fall short
    cores_s = wall_s * os.cpu_count()
    assert cores_s - 0.1 * os.cpu_count() <= busy + idle + steal <= cores_s + 0.1 * os.cpu_count()
