"""Convert MNIST (torchvision's IDX layout, downloaded when online) to sd3ray's Parquet shards.

    python jobs/prepare_data.py --data-root ../shared/data --out data/mnist_parquet
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir copy


from sd3ray.cli import job_parser, run_job
from sd3ray.data import prepare_mnist, read_metadata


def main() -> int:
    parser = job_parser(__doc__)
    parser.add_argument("--data-root", default="data", help="folder holding MNIST/raw/*-ubyte (or to download to)")
    parser.add_argument("--out", default="data/mnist_parquet",
                        help="output folder for Parquet shards, or a URI such as s3://bucket/mnist_parquet")
    parser.add_argument("--image-size", type=int, default=32, help="pad 28×28 digits to this size (default 32)")
    parser.add_argument("--no-download", action="store_true", help="never try the network")
    args = parser.parse_args()
    out = prepare_mnist(args.data_root, args.out, args.image_size, download=not args.no_download)
    meta = read_metadata(out)
    counts = ", ".join(f"{k}: {v['count']}" for k, v in meta["splits"].items())
    print(f"wrote {out} ({meta['channels']}×{meta['image_size']}×{meta['image_size']}; {counts})")
    return 0


if __name__ == "__main__":
    run_job(main)
