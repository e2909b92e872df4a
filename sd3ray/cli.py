"""Argument helpers shared by the jobs: the config/override pair every job takes, and validated number types."""

from __future__ import annotations

import argparse

from sd3ray.config import Config, ConfigError, load_config


def add_config_args(parser: argparse.ArgumentParser, default: str = "configs/mnist.yaml") -> None:
    parser.add_argument("--config", default=default, help=f"YAML config (default {default})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set model.width=512 (repeatable)")


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str] = ()) -> Config:
    try:
        return load_config(args.config, [*args.overrides, *extra])
    except ConfigError as err:
        parser.error(str(err))


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """The data flags every training job takes: raw MNIST and the prepared Parquet shards. On a cluster both must
    be paths every node sees (a shared volume)."""
    parser.add_argument("--data-root", help="folder holding MNIST/raw/*-ubyte, or to download to (data.raw_root)")
    parser.add_argument("--parquet-dir", help="prepared Parquet shards, made on first use (data.parquet_dir)")


def data_overrides(args: argparse.Namespace) -> list[str]:
    """`--set` overrides for the data flags that were given."""
    out = [f"data.raw_root={args.data_root}"] if args.data_root else []
    return out + ([f"data.parquet_dir={args.parquet_dir}"] if args.parquet_dir else [])


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value
