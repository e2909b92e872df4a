"""What every job shares: its parser (with --debug), the clean exit on sd3ray's own errors, the config/override
pair, the data flags, and validated number types."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

from sd3ray.config import Config, ConfigError, load_config
from sd3ray.errors import explained_error
from sd3ray.storage import redact

DEBUG_ENV = "SD3RAY_DEBUG"


def job_parser(doc: str | None) -> argparse.ArgumentParser:
    """A job's parser: its docstring as help, and --debug."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of expected errors too (or set {DEBUG_ENV}=1)")
    return parser


def run_job(main: Callable[[], int]) -> NoReturn:
    """Run a job's main() and exit with its code. sd3ray's own errors (bad config, missing data, unreachable
    services, bad checkpoints, a diverged loss, ...) end in one line on stderr and exit code 1; with --debug or
    SD3RAY_DEBUG=1 they raise as usual. Any other exception is a bug and keeps its traceback."""
    debug = "--debug" in sys.argv[1:] or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    from sd3ray.training.signals import Interrupted

    show_warnings_as_lines()

    try:
        code = main()
    except Interrupted as stopped:  # a clean stop on a signal: its message says where to resume from
        print(f"sd3ray: {stopped}", file=sys.stderr, flush=True)
        sys.exit(stopped.exit_code)
    except KeyboardInterrupt:
        print("sd3ray: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        known = explained_error(exc)
        if known is None or debug:
            raise
        print(f"sd3ray: error: {redact(str(known))}", file=sys.stderr, flush=True)
        sys.exit(1)
    sys.exit(code)


def add_config_args(parser: argparse.ArgumentParser, default: str | None = "configs/mnist.yaml",
                    default_help: str = "") -> None:
    parser.add_argument("--config", default=default, help=f"YAML config (default {default_help or default})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set model.width=512 (repeatable)")


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str] = ()) -> Config:
    overrides = [*args.overrides, *extra]
    init_from = requested_value("model.init_from", args.config, overrides)
    latent = requested_value("vae.source", args.config, overrides) not in ("", "none")
    pretrained = pretrained_model_keys(init_from, latent) if init_from else {}
    try:  # the pretrained transformer's shape first, so that the YAML's own model.* keys do not stand in its way
        cfg = load_config(args.config, [*pretrained_model_overrides(pretrained), *overrides])
    except ConfigError as err:
        parser.error(str(err))
    if pretrained:
        from sd3ray.model.interop import check_config

        check_config(cfg.model, pretrained, init_from)  # a key the user set to another value: one message
    return cfg


def requested_value(key: str, config: str | None, overrides: list[str]) -> str:
    """A `section.name` value as the command gives it (the last --set of it, else the YAML's), read before the config
    is built: the rest of the config is checked against the transformer `model.init_from` names."""
    for override in reversed(overrides):
        if override.startswith(f"{key}="):
            return override.split("=", 1)[1].strip()
    section, name = key.split(".", 1)
    try:
        import yaml

        raw = yaml.safe_load(open(config, encoding="utf-8")) if config else None
        return str(((raw or {}).get(section) or {}).get(name) or "")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return ""  # load_config names what is wrong with the file


def pretrained_model_keys(init_from: str, latent: bool) -> dict[str, object]:
    """The `model.*` values of the diffusers transformer at `init_from` (its config.json), read once; a latent-space
    transformer (SD3's take 16 channels) trains only in latent space, through a VAE (`vae.source`)."""
    from sd3ray.model.interop import PIXEL_CHANNELS, InteropError, locate, model_keys, read_config

    keys = model_keys(read_config(locate(init_from)), init_from)
    if keys["channels"] not in PIXEL_CHANNELS and not latent:
        raise InteropError(f"model.init_from {init_from} works on {keys['channels']}-channel latents: train it in "
                           f"latent space, through the VAE it was trained with: --set vae.source=PIPELINE "
                           f"vae.subfolder=vae (SD3's pipeline folder or hub id; docs/latent.md)")
    return keys


def pretrained_model_overrides(keys: dict[str, object]) -> list[str]:
    """`model.*` overrides that make the config describe the pretrained transformer: the model follows the
    checkpoint, and a key the user sets explicitly still wins, so that a mismatch is named rather than overruled."""
    from sd3ray.model.interop import yaml_value

    return [f"model.{key}={yaml_value(value)}" for key, value in keys.items()]


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """The data flags every training job takes: raw MNIST and the prepared Parquet shards. On a cluster both must
    be paths every node sees (a shared volume)."""
    parser.add_argument("--data-root", help="folder holding MNIST/raw/*-ubyte, or to download to (data.raw_root)")
    parser.add_argument("--parquet-dir", help="prepared Parquet shards, made on first use (data.parquet_dir)")


def add_tracking_args(parser: argparse.ArgumentParser, writes: bool = True) -> None:
    """The tracking flags every job takes: where MLflow is, and (for jobs that log) a way to log nothing."""
    parser.add_argument("--tracking-uri", default="",
                        help="MLflow server or store (sets tracking.uri; default $MLFLOW_TRACKING_URI, ./mlflow.db)")
    if writes:
        parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")


def data_overrides(args: argparse.Namespace) -> list[str]:
    """`--set` overrides for the data and tracking flags that were given."""
    out = [f"data.raw_root={args.data_root}"] if args.data_root else []
    out += [f"data.parquet_dir={args.parquet_dir}"] if args.parquet_dir else []
    return out + ([f"tracking.uri={args.tracking_uri}"] if getattr(args, "tracking_uri", "") else [])


def check_run_inputs(cfg: Config, tracking: bool = True) -> None:
    """What a training job checks once its config is known, before it builds a model or starts Ray: a prepared image
    set at `data.parquet_dir` must hold the model's images, and the tracking store must be what its URI says and
    answer (a server, a database, a SQLite file). Each problem is one message naming it and the fix."""
    from sd3ray.data.format import check_image_set
    from sd3ray.storage import resolve_tracking_uri

    check_image_set(cfg)
    if tracking:
        from sd3ray.tracking.mlflow_tracker import check_reachable

        check_reachable(resolve_tracking_uri(cfg.tracking.uri))


def run_name(text: str) -> str:
    """A run's --name: one folder name under the output or storage folder, in any script ("数字-run" is fine), but
    no path: "a/b" would nest it and "../x" would write outside the folder every other run lives in."""
    if not text.strip() or text in (".", "..") or any(c in text for c in "/\\") or text.startswith(".") \
            or not text.isprintable():
        raise argparse.ArgumentTypeError(f"{text!r} is not a run name: use one folder name (letters, digits, '-', "
                                         f"'_', '.'; not starting with '.'), without '/', such as my-run-2")
    return text


def show_warnings_as_lines() -> None:
    """sd3ray's own warnings (a prompt cut to text.max_length, ...) as one console line each, instead of Python's
    form with the file, line number and the source line that raised it."""
    default = warnings.showwarning
    package = f"{os.sep}sd3ray{os.sep}"

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        if package not in filename:
            default(message, category, filename, lineno, file, line)
            return
        print(f"sd3ray: warning: {redact(str(message))}", file=file or sys.stderr, flush=True)

    warnings.showwarning = show


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


def shift_value(text: str) -> float | str:
    """A sampling shift: a number > 0, or auto."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0 or auto, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0 or auto, got {text!r}")
    return value


def add_guidance_args(parser: argparse.ArgumentParser) -> None:
    """Guidance beyond its scale and the sampler's time shift, for the jobs that sample (default: the run's sample
    settings)."""
    parser.add_argument("--shift", type=shift_value, metavar="ALPHA",
                        help="time shift of the sampler's steps (SD3 §5.3.2): above 1 spends more of them near "
                             "noise; auto: from the drawn size's token count (default: the run's sample.shift)")
    parser.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                        help="apply guidance only for t in [LO, HI] (t = 1 is noise), e.g. 0.2 0.75")
    parser.add_argument("--guide", metavar="CHECKPOINT",
                        help="autoguidance: guide with this weaker model (checkpoint, run id, models:/...) instead "
                             "of the unconditional branch; '' = classifier-free guidance")
