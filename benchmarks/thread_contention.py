"""Two torch processes on one CPU machine: one alone, then two at once with torch's default threads (one per core
each), then two at once with the cores shared out through OMP_NUM_THREADS. torch's OpenMP threads spin while they
wait for one another, so two processes that each take every core can run many times slower than either alone:
two local trainings side by side, or a training beside a test run.

    python -m benchmarks.thread_contention            # a small training loop, 1,500 steps per process

Each process trains the same small MLP with Adam; the table gives each setup's slowest process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from sd3ray.cli import positive_int


def train_loop(steps: int) -> float:
    """Seconds for `steps` Adam steps of a 4-layer MLP on a batch of 64: small matrices, the size where OpenMP's
    synchronisation, not arithmetic, decides the speed."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
    optimizer = torch.optim.Adam(model.parameters())
    batch = torch.randn(64, 256)
    started = time.perf_counter()
    for _ in range(steps):
        loss = model(batch).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


def run_side_by_side(processes: int, steps: int, threads: int | None) -> list[tuple[float, int]]:
    """Start `processes` copies of the loop at once (with OMP_NUM_THREADS=`threads`, or torch's default) and return
    each one's seconds and the threads torch gave it."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "benchmarks.thread_contention", "--child", "--steps", str(steps)]
    children = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    outputs = [child.communicate()[0] for child in children]
    if any(child.returncode for child in children):
        raise SystemExit("thread_contention: a child process failed")
    return [(float(out.split()[-2]), int(out.split()[-1])) for out in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=positive_int, default=1500, help="training steps per process (default 1500)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        print(f"{train_loop(args.steps):.3f} {torch.get_num_threads()}")
        return

    import torch

    from sd3ray.training.machine import describe_machine

    cores = len(os.sched_getaffinity(0))
    setups = [("1 process, torch's default threads", 1, None),
              ("2 processes at once, torch's default threads", 2, None),
              (f"2 processes at once, OMP_NUM_THREADS={max(1, cores // 2)}", 2, max(1, cores // 2))]
    print(describe_machine(torch.device("cpu")))
    print(f"command: python -m benchmarks.thread_contention --steps {args.steps}")
    print("\n| setup | threads per process | seconds (slowest process) |\n|---|---|---|")
    for label, processes, threads in setups:
        runs = run_side_by_side(processes, args.steps, threads)
        print(f"| {label} | {runs[0][1]} | {max(seconds for seconds, _ in runs):.3g} |", flush=True)


if __name__ == "__main__":
    main()
