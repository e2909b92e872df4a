"""What a run's start-up pays for frozen pretrained text encoders, by path: encoding the set's prompts in memory
(loading the encoders, then one pass over the distinct prompts) against reading `text_embeddings.parquet`.

    python -m benchmarks.text_paths --parquet-dir data/shapes_parquet --text-encoder enc/clip_l \\
        --text-encoder enc/t5 --text-max-length 40 --rounds 3

The two paths alternate, `--rounds` times each, in one process. The first load also imports transformers, which is
why the first round stands apart. The table must exist (`jobs/prepare_data.py --existing --text-encoder ...`).
"""

from __future__ import annotations

import argparse
import time

import torch

from sd3ray.config import TextConfig
from sd3ray.data.text_embeddings import TABLE, data_prompts, read_table, use_precomputed
from sd3ray.model.pretrained_text import PretrainedTextEncoder, inspect, joined_dims
from sd3ray.training.machine import describe_machine


def one_round(text: TextConfig, parquet_dir: str, prompts: list[str]) -> dict[str, float]:
    dims = joined_dims([inspect(source) for source in text.encoder])
    started = time.perf_counter()
    memory = PretrainedTextEncoder(text, *dims)
    memory.load()
    loaded = time.perf_counter()
    memory.tokenize(prompts)
    encoded = time.perf_counter()
    table = PretrainedTextEncoder(text, *dims)
    use_precomputed(table, parquet_dir)
    table.tokenize(prompts)
    read = time.perf_counter()
    if table.frozen.models is not None:
        raise SystemExit(f"{parquet_dir}/{TABLE} was not used (other encoders?); rebuild it first")
    return {"load_s": loaded - started, "encode_s": encoded - loaded, "table_s": read - encoded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parquet-dir", required=True)
    parser.add_argument("--text-encoder", action="append", required=True)
    parser.add_argument("--text-max-length", type=int, default=TextConfig.max_length)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    text = TextConfig(encoder=tuple(args.text_encoder), max_length=args.text_max_length)
    if read_table(args.parquet_dir) is None:
        raise SystemExit(f"{args.parquet_dir} has no {TABLE}: python jobs/prepare_data.py --out {args.parquet_dir} "
                         f"--existing --text-encoder ...")
    prompts = data_prompts(args.parquet_dir)
    print(f"{describe_machine(torch.device('cpu'))}\n{len(prompts)} distinct prompts, encoders "
          f"{' + '.join(args.text_encoder)}\n")
    print("| round | load encoders (s) | encode in memory (s) | read the table (s) |\n|---|---|---|---|")
    for index in range(args.rounds):
        row = one_round(text, args.parquet_dir, prompts)
        print(f"| {index + 1} | {row['load_s']:.3f} | {row['encode_s']:.3f} | {row['table_s']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
