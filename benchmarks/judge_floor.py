"""The judge's floor: the classifier-FID of real MNIST digits against the real test set, at each sample count the
project reports. The floor sd3ray divides by (`Reference.floor`) draws real training digits with exactly the digit
counts the samples are prompted for (`eval_prompts`: 100 of each digit at 1,000) and averages three draws; beside it
this prints three draws with the training set's natural class counts, which the floor used to be, to show what
their multinomial noise adds.

    python -m benchmarks.judge_floor --parquet-dir data/mnist_parquet          # 250, 500 and 1,000 samples
"""

from __future__ import annotations

import argparse
import platform
import subprocess

import torch

from sd3ray.cli import positive_int

NATURAL_SEEDS = (0, 1, 2)


def cpu_line() -> str:
    """The machine, for the figures' provenance: the CPU's model name and torch's CPU capability."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor()} ({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}"


def floor_rows(parquet_dir: str, counts: list[int]) -> list[dict[str, float]]:
    """One row per sample count: the balanced floor's mean and spread, and each natural draw's FID."""
    from sd3ray.data.format import read_split
    from sd3ray.evaluation.judge import Reference, eval_prompts, frechet_distance, judge_outputs, load_judge

    train, test = read_split(parquet_dir, "train"), read_split(parquet_dir, "test")
    reference = Reference(load_judge(train), train, test)
    rows = []
    for n in counts:
        mean, spread = reference.floor(eval_prompts(n)[1])
        natural = []
        for seed in NATURAL_SEEDS:
            index = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
            _, features = judge_outputs(reference.judge, train.images[index])
            natural.append(frechet_distance(features.numpy(), reference.test_features.numpy()))
        rows.append({"samples": n, "floor": mean, "floor_std": spread, **{f"natural_{s}": f for s, f in
                                                                           zip(NATURAL_SEEDS, natural)}})
    return rows


def markdown(rows: list[dict[str, float]]) -> str:
    lines = ["| samples | floor: balanced draws, mean ± std of 3 | natural class counts, 3 draws |", "|---|---|---|"]
    for r in rows:
        natural = ", ".join(f"{r[f'natural_{s}']:.2f}" for s in NATURAL_SEEDS)
        lines.append(f"| {r['samples']:,} | {r['floor']:.2f} ± {r['floor_std']:.2f} | {natural} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parquet-dir", default="data/mnist_parquet", help="real MNIST as a prepared image set")
    parser.add_argument("--samples", type=positive_int, nargs="+", default=[250, 500, 1000])
    args = parser.parse_args()
    print(f"machine: {cpu_line()}")
    print(markdown(floor_rows(args.parquet_dir, args.samples)))


if __name__ == "__main__":
    main()
