"""Checkpoints: one directory per step, written atomically, verified before anything is loaded.

A checkpoint directory holds
    model.pt        {"model": Denoiser state, "ema": EMA Denoiser state}
    optimizer.pt    {"optimizer": ..., "scheduler": ...}          (absent in weights-only exports)
    rng.pt          torch CPU (and CUDA) RNG states
    meta.json       step, samples seen, config hash, MLflow run id, format version, and with frozen pretrained
                    text encoders their sources and content hashes (their weights are never written here)
    config.yaml     the resolved Config
    MANIFEST.json   written last: every file's size and SHA-256
Files are written into a hidden temporary sibling and renamed into place, and MANIFEST.json is checked on load,
so a crash mid-write can never produce a directory that resume would take for a checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from sd3ray.config import Config, config_hash, flatten, from_dict, to_yaml
from sd3ray.errors import Sd3rayError, StorageError
from sd3ray.model.pretrained_text import fingerprint, is_pretrained, same_encoders
from sd3ray.storage import read_json, redact

FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
STEP_PREFIX = "step_"


class CheckpointError(Sd3rayError):
    """A checkpoint is missing, partial, corrupt, or belongs to a different model."""


@dataclass
class CheckpointData:
    step: int
    config: Config
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _WriteRecorder:
    """A file for torch.save that remembers the OSError a write raised: torch reports a failed write (a full disk)
    as a RuntimeError about zip positions, and the errno is what tells a full disk from a bug."""

    def __init__(self, file: Any) -> None:
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.file.flush()


def save_tensors(obj: Any, path: Path) -> None:
    """torch.save, raising the OSError itself (e.g. ENOSPC) when the filesystem refuses a write."""
    with open(path, "wb") as f:
        recorder = _WriteRecorder(f)
        try:
            torch.save(obj, recorder)
        except RuntimeError:
            if recorder.error is not None:
                raise recorder.error from None
            raise


def write_checkpoint(directory: Path, data: CheckpointData, weights_only: bool = False) -> Path:
    """Write `data` into the (new or empty) `directory`, manifest last. Prefer `save_checkpoint` for atomicity."""
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors({"model": data.model, "ema": data.ema}, directory / "model.pt")
    if not weights_only:
        save_tensors({"optimizer": data.optimizer, "scheduler": data.scheduler}, directory / "optimizer.pt")
        save_tensors(data.rng or {}, directory / "rng.pt")
    meta = {**data.meta, "step": data.step, "config_hash": config_hash(data.config), "format": FORMAT_VERSION,
            "weights_only": weights_only}
    if is_pretrained(data.config.text):
        meta["text_encoders"] = fingerprint(data.config.text)
    (directory / "meta.json").write_text(json.dumps(meta, indent=2))
    (directory / "config.yaml").write_text(to_yaml(data.config))
    files = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {name: {"size": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
                for name in files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return directory


def out_of_space(exc: OSError, where: Path | str, step: int, kept: str) -> StorageError:
    """The error for a checkpoint that did not fit: what is intact (`kept`), and what to do."""
    return StorageError(f"no space left in {redact(str(where))} while writing the step-{step} checkpoint "
                        f"({exc.strerror}); {kept}. Free space there or set train.output_dir (or --storage-path) "
                        f"to a larger disk, then resume")


def save_checkpoint(root: Path, data: CheckpointData, keep: int | None = None) -> Path:
    """Atomically create root/step_XXXXXXXX and keep only the newest `keep` checkpoints. A full disk leaves the
    existing checkpoints as they were and raises StorageError."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{STEP_PREFIX}{data.step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        write_checkpoint(tmp, data)
        for path in tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if final.exists():  # a re-run of the same step replaces the old one whole
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            previous = latest_checkpoint(root)
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
            raise out_of_space(exc, root, data.step, f"nothing was half-written and {kept}") from exc
        raise
    if keep is not None:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def verify(directory: Path) -> dict[str, Any]:
    """Raise CheckpointError unless every file in the manifest is present and intact; return meta."""
    directory = Path(directory)
    if directory.is_file():
        raise CheckpointError(f"checkpoint {directory} is a file; a checkpoint is a folder (step_XXXXXXXX) holding "
                              f"{MANIFEST}, e.g. runs/NAME/checkpoints/step_00001000")
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist")
    if not (directory / MANIFEST).is_file():
        raise CheckpointError(f"{directory} is not a complete checkpoint ({MANIFEST} missing: the write never "
                              f"finished). Resume from an earlier one, e.g. --resume latest")
    earlier = "resume from or sample an earlier checkpoint"
    manifest = read_json(directory / MANIFEST, "checkpoint manifest", earlier, CheckpointError)
    for name, expected in manifest.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != expected["size"] or _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {directory} is corrupt: {name} is missing or does not match its "
                                  f"checksum. Resume from an earlier checkpoint")
    return read_json(directory / "meta.json", "checkpoint metadata", earlier, CheckpointError)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary and partial directories are ignored)."""
    if not Path(root).is_dir():
        return []
    found = [p for p in Path(root).iterdir() if p.name.startswith(STEP_PREFIX) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def model_config_mismatch(saved: Config, wanted: Config) -> list[str]:
    """Keys of model/text config whose values differ: these change parameter shapes or semantics."""
    a, b = flatten(saved), flatten(wanted)
    return [f"{k}: checkpoint has {a[k]!r}, config has {b[k]!r}"
            for k in sorted(a) if k.startswith(("model.", "text.")) and a[k] != b.get(k)]


def check_text_encoders(directory: Path, saved: Config, meta: dict[str, Any]) -> None:
    """A checkpoint trained on frozen pretrained encoders loads only with those very encoders: other weights under
    the same path would condition the MM-DiT on embeddings it never saw. A missing encoder is the encoder's own
    message (what to fetch, where)."""
    if not is_pretrained(saved.text):
        return
    here, recorded = fingerprint(saved.text), meta.get("text_encoders", [])
    if not same_encoders(here, recorded):
        raise CheckpointError(f"checkpoint {directory} was trained with text encoders {recorded}, but "
                              f"text.encoder now finds {here}; put the encoders it was trained with back at "
                              f"those paths")


def load_tensors(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """Tensors and plain containers from a torch file, never code: the manifest proves a file is whole, not that
    whoever wrote it (and its manifest) meant well, so nothing else is unpickled."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path} holds something other than tensors and plain containers. sd3ray never "
                              f"writes such files and refuses to load them, since unpickling them could run code. "
                              f"Use a checkpoint sd3ray wrote, from a source you trust.") from exc


def load_checkpoint(directory: Path, expected: Config | None = None, map_location: str | torch.device = "cpu",
                    weights_only_ok: bool = True) -> CheckpointData:
    """Verify then load. With `expected`, a checkpoint of a different model fails naming each mismatched key.
    The optimizer and RNG state are read only for a resume (`weights_only_ok=False`)."""
    directory = Path(directory)
    meta = verify(directory)
    saved_cfg = from_dict(yaml.safe_load((directory / "config.yaml").read_text()))
    if expected is not None:
        mismatch = model_config_mismatch(saved_cfg, expected)
        if mismatch:
            raise CheckpointError(f"checkpoint {directory} was trained with a different model:\n  "
                                  + "\n  ".join(mismatch) + "\nUse the checkpoint's config.yaml or a fresh run name.")
    check_text_encoders(directory, saved_cfg, meta)
    if meta.get("weights_only") and not weights_only_ok:
        raise CheckpointError(f"{directory} holds weights only (no optimizer state); it can be sampled from and "
                              f"evaluated, not resumed")
    weights = load_tensors(directory / "model.pt", map_location)
    data = CheckpointData(step=meta["step"], config=saved_cfg, model=weights["model"], ema=weights["ema"], meta=meta)
    if not weights_only_ok:
        opt = load_tensors(directory / "optimizer.pt", map_location)
        data.optimizer, data.scheduler = opt["optimizer"], opt["scheduler"]
        data.rng = load_tensors(directory / "rng.pt")
    return data


def upload_checkpoint(local: Path, destination: str, attempts: int = 5, first_wait_s: float = 2.0) -> None:
    """Copy a checkpoint directory to `destination` (a folder or a URI such as s3://bucket/runs/NAME/step_...),
    MANIFEST.json last, so that a copy cut short is never taken for a checkpoint. Transient failures (a throttled
    or briefly unreachable object store, beyond its client's own retries) are retried with doubling waits; a full
    destination, or the last failure, is a StorageError."""
    import time

    import pyarrow.fs as pafs

    from sd3ray.storage import open_folder

    fs, root = open_folder(destination)
    names = sorted((p.name for p in local.iterdir() if p.is_file()), key=lambda name: name == MANIFEST)
    wait = first_wait_s
    for attempt in range(1, attempts + 1):
        try:
            fs.create_dir(root, recursive=True)
            for name in names:
                pafs.copy_files(str(local / name), f"{root}/{name}", destination_filesystem=fs)
            return
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                step = int(json.loads((local / "meta.json").read_text())["step"])
                raise out_of_space(exc, destination, step, "earlier checkpoints there are untouched") from exc
            if attempt == attempts:
                raise StorageError(f"could not write checkpoint {local.name} to {redact(destination)} after {attempts} "
                                   f"attempts ({exc}); check the storage's reachability and credentials") from exc
            print(f"sd3ray: warning: writing checkpoint {local.name} failed ({exc}); retrying in {wait:g} s "
                  f"({attempt}/{attempts})", flush=True)
            time.sleep(wait)
            wait *= 2
