"""Train (or load from cache) the frozen MNIST judge and report its accuracy on the real test set.

    python jobs/train_judge.py --data-root ../shared/data
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir copy


from sd3ray.cli import job_parser, run_job
from sd3ray.data.format import read_split
from sd3ray.data.mnist import ensure_parquet
from sd3ray.evaluation.judge import cache_dir, judge_cache_key, judge_outputs, load_judge


def main() -> int:
    parser = job_parser(__doc__)
    parser.add_argument("--data-root", default="data", help="folder holding MNIST/raw/*-ubyte")
    parser.add_argument("--parquet-dir", default="data/mnist_parquet")
    args = parser.parse_args()
    parquet = ensure_parquet(args.parquet_dir, args.data_root, 32, download=True)
    train, test = read_split(parquet, "train"), read_split(parquet, "test")
    judge = load_judge(train)
    preds, _ = judge_outputs(judge, test.images)
    accuracy = (preds == test.labels).double().mean().item()
    print(f"judge {cache_dir() / f'judge-{judge_cache_key(train)}.pt'}: test accuracy {accuracy:.4f} "
          f"({int((preds != test.labels).sum())} errors in {len(test)})")
    return 0 if accuracy >= 0.992 else 1


if __name__ == "__main__":
    run_job(main)
