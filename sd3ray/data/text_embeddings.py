"""Prompt embeddings of frozen pretrained text encoders, computed once per distinct prompt and kept beside an image
set as `text_embeddings.parquet`, so training reads them instead of running (or even loading) the encoders.

The table has one row per distinct prompt the set trains with (its captions, or every rendering of its digit
labels, and the empty prompt), not one per image: captions repeat, and images are the bulk of a shard, so neither
is rewritten when the encoders change. Columns: `caption` (string), `context` (L·D float32 bytes), `pooled`
(P float32 bytes), `mask` (L bytes, 1 = real token). Its schema metadata records the encoders' fingerprints (source,
kind, content hash) and the shapes; a table made by other encoders is ignored with one line saying so.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sd3ray.data.format import read_metadata
from sd3ray.data.prompts import digit_prompts
from sd3ray.errors import DataError
from sd3ray.model.pretrained_text import PretrainedTextEncoder, same_encoders
from sd3ray.storage import is_file, open_folder

TABLE = "text_embeddings.parquet"
SCHEMA_KEY = b"sd3ray.text"


def data_prompts(parquet_dir: str | Path) -> list[str]:
    """Every prompt a run on this set may encode: "" first, then its captions (all splits) or digit renderings."""
    meta = read_metadata(parquet_dir)
    fs, root = open_folder(parquet_dir)
    prompts: dict[str, None] = {"": None}
    for entry in meta["splits"].values():
        if not entry.get("captioned"):
            for digit in range(10):
                prompts.update(dict.fromkeys(digit_prompts(digit)))
            continue
        for name in entry["shards"]:
            with fs.open_input_file(f"{root}/{name}") as f:
                captions = pq.read_table(f, columns=["caption"]).column("caption").to_pylist()
            prompts.update(dict.fromkeys(c or "" for c in captions))
    return list(prompts)


def write_table(parquet_dir: str | Path, prompts: list[str], context: np.ndarray, pooled: np.ndarray,
                mask: np.ndarray, fingerprint: list[dict[str, str]]) -> str:
    """Write the table (context (N,L,D), pooled (N,P), mask (N,L)) into the set's folder or URI; return its path."""
    n, length, dim = context.shape
    info = {"encoders": fingerprint, "length": length, "context_dim": dim, "pooled_dim": pooled.shape[1]}
    table = pa.table({
        "caption": pa.array(prompts, pa.string()),
        "context": pa.array([r.tobytes() for r in context.astype(np.float32)], pa.binary(length * dim * 4)),
        "pooled": pa.array([r.tobytes() for r in pooled.astype(np.float32)], pa.binary(pooled.shape[1] * 4)),
        "mask": pa.array([r.tobytes() for r in mask.astype(np.uint8)], pa.binary(length)),
    }).replace_schema_metadata({SCHEMA_KEY: json.dumps(info).encode()})
    fs, root = open_folder(parquet_dir)
    with tempfile.TemporaryDirectory() as tmp:  # whole or absent: written aside, then moved or uploaded
        local = Path(tmp) / TABLE
        pq.write_table(table, local)
        with open(local, "rb") as src, fs.open_output_stream(f"{root}/.{TABLE}.partial") as dst:
            dst.write(src.read())
    fs.move(f"{root}/.{TABLE}.partial", f"{root}/{TABLE}")
    return f"{parquet_dir}/{TABLE}"


def read_table(parquet_dir: str | Path) -> tuple[dict, list[str], torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(info, prompts, context (N,L,D), pooled (N,P), mask (N,L) bool), or None when the set has no table."""
    fs, root = open_folder(parquet_dir)
    if not is_file(fs, f"{root}/{TABLE}"):
        return None
    try:
        with fs.open_input_file(f"{root}/{TABLE}") as f:
            table = pq.read_table(f)
        info = json.loads(table.schema.metadata[SCHEMA_KEY])
    except (pa.ArrowInvalid, OSError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{parquet_dir}/{TABLE} cannot be read ({str(exc).splitlines()[0]}); delete it or rebuild "
                        f"it with jobs/prepare_data.py --text-encoder") from None
    length, dim, pooled_dim = info["length"], info["context_dim"], info["pooled_dim"]

    def column(name: str, dtype: type, shape: tuple[int, ...]) -> torch.Tensor:
        raw = b"".join(table.column(name).to_pylist())
        return torch.from_numpy(np.frombuffer(raw, dtype=dtype).reshape(len(table), *shape).copy())

    return (info, table.column("caption").to_pylist(), column("context", np.float32, (length, dim)),
            column("pooled", np.float32, (pooled_dim,)), column("mask", np.uint8, (length,)).bool())


def use_precomputed(encoder: PretrainedTextEncoder, parquet_dir: str | Path) -> str:
    """Fill the encoder's cache from the set's table when it was made by these encoders; one line saying which
    path the run takes and why."""
    names = "+".join(s.kind for s in encoder.specs)
    found = read_table(parquet_dir)
    if found is None:
        return (f"text: {names} encoders frozen; each distinct prompt is encoded once, in memory (no {TABLE}: "
                f"jobs/prepare_data.py --text-encoder writes one for large sets)")
    info, prompts, context, pooled, mask = found
    if not same_encoders(info["encoders"], encoder.fingerprint()):
        return (f"text: {parquet_dir}/{TABLE} was made by other encoders ({info['encoders']}); ignored, each "
                f"distinct prompt is encoded once, in memory")
    encoder.add(prompts, context, pooled, mask)
    return f"text: {len(prompts)} prompt embeddings read from {parquet_dir}/{TABLE} (precomputed by {names})"
