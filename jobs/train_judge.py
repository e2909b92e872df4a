"""Load the frozen MNIST judge (shipped with sd3ray for real MNIST, else trained and cached) and report its accuracy
on the real test set; --retrain trains it again from its recipe and says whether the weights match bit for bit.

    python jobs/train_judge.py --data-root ../shared/data
    python jobs/train_judge.py --data-root ../shared/data --retrain
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir copy


import torch

from sd3ray.cli import job_parser, run_job
from sd3ray.data.format import read_split
from sd3ray.data.mnist import ensure_parquet
from sd3ray.evaluation.judge import (
    Judge,
    cache_dir,
    judge_cache_key,
    judge_outputs,
    load_judge,
    shipped_judge_path,
    train_judge,
)


def main() -> int:
    parser = job_parser(__doc__)
    parser.add_argument("--data-root", default="data", help="folder holding MNIST/raw/*-ubyte")
    parser.add_argument("--parquet-dir", default="data/mnist_parquet")
    parser.add_argument("--retrain", action="store_true",
                        help="train the judge again and compare it with the shipped or cached one (a few minutes)")
    args = parser.parse_args()
    parquet = ensure_parquet(args.parquet_dir, args.data_root, 32, download=True)
    train, test = read_split(parquet, "train"), read_split(parquet, "test")
    path = shipped_judge_path(train) or cache_dir() / f"judge-{judge_cache_key(train)}.pt"
    judge = load_judge(train)
    preds, _ = judge_outputs(judge, test.images)
    accuracy = (preds == test.labels).double().mean().item()
    print(f"judge {path}: test accuracy {accuracy:.4f} ({int((preds != test.labels).sum())} errors in {len(test)})")
    if args.retrain:
        print(f"sd3ray: judge: retraining from its recipe to compare with {path}", flush=True)
        return 0 if same_weights(train_judge(train), judge) and accuracy >= 0.992 else 1
    return 0 if accuracy >= 0.992 else 1


def same_weights(fresh: Judge, kept: Judge) -> bool:
    """Print and return whether two judges hold the same weights, bit for bit."""
    kept_state = kept.state_dict()
    differ = {k: (v.double() - kept_state[k].double()).abs().max().item()
              for k, v in fresh.state_dict().items() if not torch.equal(v, kept_state[k])}
    if not differ:
        print("retrained judge: identical to the kept one, bit for bit")
        return True
    worst = max(differ, key=differ.get)
    print(f"retrained judge: {len(differ)} of {len(kept_state)} tensors differ "
          f"(largest: {worst} by {differ[worst]:.3g})")
    return False


if __name__ == "__main__":
    run_job(main)
