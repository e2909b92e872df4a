"""`python -m pytest -n 0 --cpu-table FILE`: the machine's CPU seconds spent during each test, beside its wall time.

`--durations` says how long a test took; on a 2-core machine that is not what it costs, because a test that waits
(on a poll, a server, a sleep) leaves a core idle, while a Ray fit keeps both busy with processes pytest never sees.
This reads /proc/stat before and after each test (setup, call and teardown), so that the CPU of every process the
test started counts, and writes one row per test, the costliest first: busy, idle and steal seconds (steal: time a
shared host gave to others, which makes the same test slower on a busy host). Linux only; off unless asked for.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

_ROWS: list[Cost] = []
# /proc/stat's cpu line, in clock ticks: user nice system idle iowait irq softirq steal
_BUSY_FIELDS, _IDLE_FIELDS, _STEAL_FIELD = (0, 1, 2, 5, 6), (3, 4), 7


@dataclass(frozen=True)
class Cost:
    test: str
    wall_s: float
    busy_s: float
    idle_s: float
    steal_s: float


def _cpu_seconds() -> tuple[float, float, float]:
    """The machine's busy, idle and steal CPU seconds since boot, all cores together."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    per_s = os.sysconf("SC_CLK_TCK")
    return (sum(ticks[i] for i in _BUSY_FIELDS) / per_s, sum(ticks[i] for i in _IDLE_FIELDS) / per_s,
            ticks[_STEAL_FIELD] / per_s)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--cpu-table", metavar="FILE", default=None,
                     help="write each test's wall time and the machine's busy/idle/steal CPU seconds to FILE (TSV)")


def pytest_configure(config: pytest.Config) -> None:
    # /proc/stat is the whole machine's: with tests running side by side, one test's row would hold its neighbour's
    if config.getoption("--cpu-table") and getattr(config.option, "numprocesses", None):
        raise pytest.UsageError("--cpu-table measures the whole machine during each test, so tests must run one at a "
                                "time: add -n 0")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    if not item.config.getoption("--cpu-table"):
        yield
        return
    before, started = _cpu_seconds(), time.monotonic()
    yield
    after = _cpu_seconds()
    _ROWS.append(Cost(item.nodeid, time.monotonic() - started, *(b - a for a, b in zip(before, after))))


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    path = config.getoption("--cpu-table")
    if not path or not _ROWS:
        return
    rows = sorted(_ROWS, key=lambda r: r.busy_s, reverse=True)
    lines = ["test\twall_s\tbusy_cpu_s\tidle_cpu_s\tsteal_cpu_s"]
    lines += [f"{r.test}\t{r.wall_s:.1f}\t{r.busy_s:.1f}\t{r.idle_s:.1f}\t{r.steal_s:.1f}" for r in rows]
    Path(path).write_text("\n".join(lines) + "\n")
    busy, idle, steal, wall = (sum(getattr(r, f) for r in rows) for f in ("busy_s", "idle_s", "steal_s", "wall_s"))
    terminalreporter.write_sep("=", f"CPU per test, costliest first (all {len(rows)} in {path})")
    terminalreporter.write_line(f"{'busy':>7} {'idle':>7} {'steal':>6} {'wall':>7}  test (CPU s: all cores)")
    for r in rows[:15]:
        terminalreporter.write_line(f"{r.busy_s:7.1f} {r.idle_s:7.1f} {r.steal_s:6.1f} {r.wall_s:7.1f}  {r.test}")
    terminalreporter.write_line(f"{busy:7.1f} {idle:7.1f} {steal:6.1f} {wall:7.1f}  all tests")
