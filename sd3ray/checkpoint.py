"""Checkpoints: one directory per step, written atomically, verified before anything is loaded.

A checkpoint directory holds
    model.pt        {"model": Denoiser state, "ema": EMA Denoiser state}
    optimizer.pt    {"optimizer": ..., "scheduler": ...}          (absent in weights-only exports)
    rng.pt          torch CPU (and CUDA) RNG states
    meta.json       step, samples seen, config hash, MLflow run id, format version, and with frozen pretrained
                    text encoders their sources and content hashes (their weights are never written here); a LoRA
                    run's model.pt holds the adapter alone and meta.json its base model's source and hash
    config.yaml     the resolved Config
    MANIFEST.json   written last: every file's size and SHA-256
Files are written into a hidden temporary sibling and renamed into place, and MANIFEST.json is checked on load,
so a crash mid-write can never produce a directory that resume would take for a checkpoint.

A sharded checkpoint (FSDP runs, `sd3ray.training.parallel`) is written by every rank at once through
torch.distributed.checkpoint (DCP), and holds instead of model.pt and optimizer.pt
    __R_0.distcp    rank R's shards of the model, the EMA and the AdamW moments, keyed by parameter name
    .metadata       DCP's index: which bytes of which file hold which slice of each tensor
    schedule.pt     {"scheduler": ..., "param_groups": AdamW's current learning rate and hyperparameters}
with rng.pt, meta.json ("layout": "sharded", the worker count), config.yaml and MANIFEST.json (every rank's files,
written last by rank 0) as above. Any worker count resumes it (DCP reads each rank's slices from whichever files
hold them), and `load_checkpoint` assembles its weights in one process for sampling, evaluation and exports.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from sd3ray.config import Config, ConfigError, config_hash, flatten, from_dict, to_yaml
from sd3ray.errors import Sd3rayError, StorageError
from sd3ray.model import interop, lora, vae
from sd3ray.model.pretrained_text import fingerprint, is_pretrained, same_encoders
from sd3ray.model.vae import uses_vae
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
    # every rank's own shards (DTensor state dicts, the optimizer's keyed by parameter name), written by all ranks
    # together as one sharded checkpoint; False: whole state dicts, written by one process
    sharded: bool = False


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
    """Write `data` into the (new or empty) `directory`, manifest last. Prefer `save_checkpoint` for atomicity.
    Sharded data is a collective: every rank calls this with its own shards (`write_sharded`)."""
    if data.sharded:
        return write_sharded(directory, data)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors({"model": data.model, "ema": data.ema}, directory / "model.pt")
    if not weights_only:
        save_tensors({"optimizer": data.optimizer, "scheduler": data.scheduler}, directory / "optimizer.pt")
        save_tensors(data.rng or {}, directory / "rng.pt")
    describe(directory, data, {"weights_only": weights_only})
    files = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    (directory / MANIFEST).write_text(json.dumps({name: _entry(directory / name) for name in files}, indent=2))
    return directory


def _entry(path: Path) -> dict[str, Any]:
    """A file's line in the manifest."""
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def describe(directory: Path, data: CheckpointData, extra: dict[str, Any]) -> list[str]:
    """Write meta.json and config.yaml; returns their names."""
    meta = {**data.meta, "step": data.step, "config_hash": config_hash(data.config), "format": FORMAT_VERSION,
            **extra}
    if is_pretrained(data.config.text):
        meta["text_encoders"] = fingerprint(data.config.text)
    if uses_vae(data.config.vae):  # the frozen VAE is named and hashed, never copied here
        meta["vae"] = vae.inspect(data.config.vae).fingerprint()
    if lora.is_adapter_state(data.ema):  # the base is model.init_from's, named and hashed, never copied here
        meta["base_model"] = interop.fingerprint(data.config.model.init_from)
    (directory / "meta.json").write_text(json.dumps(meta, indent=2))
    (directory / "config.yaml").write_text(to_yaml(data.config))
    return ["meta.json", "config.yaml"]


# ----------------------------------------------------------------------------------- sharded checkpoints

SHARDED = "sharded"  # meta.json's "layout" of a checkpoint written by every rank through DCP
DCP_INDEX = ".metadata"
SCHEDULE = "schedule.pt"


def _grouped() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if _grouped() else (0, 1)


@contextlib.contextmanager
def _alone_is_intended() -> Iterator[None]:
    """DCP warns whenever it reads or writes in one process without a process group; sd3ray does so on purpose
    (one process assembling a checkpoint, or a run of one process)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _all_ranks(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (this process's alone without a process group)."""
    import torch.distributed as dist

    rank, world = _rank_and_world()
    if world == 1:
        return [value]
    values: list[Any] = [None] * world
    dist.all_gather_object(values, value)
    return values


def write_sharded(directory: Path, data: CheckpointData) -> Path:
    """A collective: every rank writes its own shards of the model, the EMA and AdamW into `directory` (one folder
    all ranks share, or each rank's own, to be uploaded into one), rank 0 the index, the rest of the training
    state and, last, the manifest of every rank's files. Returns `directory`."""
    import torch.distributed.checkpoint as dcp

    rank, world = _rank_and_world()
    directory.mkdir(parents=True, exist_ok=True)
    # tensors only in the shards (DCP would pickle anything else); the plain rest goes to schedule.pt
    state = {"model": data.model, "ema": data.ema, "optimizer": {"state": data.optimizer["state"]}}
    with _alone_is_intended():
        dcp.save(state, storage_writer=dcp.FileSystemWriter(directory), no_dist=not _grouped())
    mine = sorted(p.name for p in directory.iterdir() if p.name.startswith(f"__{rank}_"))
    if rank == 0:
        save_tensors({"scheduler": data.scheduler, "param_groups": data.optimizer["param_groups"]},
                     directory / SCHEDULE)
        save_tensors(data.rng or {}, directory / "rng.pt")
        mine += [DCP_INDEX, SCHEDULE, "rng.pt",
                 *describe(directory, data, {"weights_only": False, "layout": SHARDED, "world_size": world})]
    files = {name: _entry(directory / name) for name in mine}
    manifest = {name: entry for ranks_files in _all_ranks(files) for name, entry in ranks_files.items()}
    if rank == 0:
        (directory / MANIFEST).write_text(json.dumps(dict(sorted(manifest.items())), indent=2))
    return directory


def out_of_space(exc: OSError, where: Path | str, step: int, kept: str) -> StorageError:
    """The error for a checkpoint that did not fit: what is intact (`kept`), and what to do."""
    return StorageError(f"no space left in {redact(str(where))} while writing the step-{step} checkpoint "
                        f"({exc.strerror}); {kept}. Free space there or set train.output_dir (or --storage-path) "
                        f"to a larger disk, then resume")


def save_checkpoint(root: Path, data: CheckpointData, keep: int | None = None) -> Path:
    """Atomically create root/step_XXXXXXXX and keep only the newest `keep` checkpoints. A full disk leaves the
    existing checkpoints as they were and raises StorageError. Sharded data is a collective: every rank calls this
    on a `root` they all share, writes its shards into one temporary folder, and rank 0 renames it into place once
    the manifest of every rank's files is written."""
    rank = _rank_and_world()[0] if data.sharded else 0
    final = root / f"{STEP_PREFIX}{data.step:08d}"
    made = None
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        made = tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root)
    tmp = Path(_all_ranks(made)[0] if data.sharded else made)
    try:
        write_checkpoint(tmp, data)
        if rank == 0:
            for path in tmp.iterdir():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            if final.exists():  # a re-run of the same step replaces the old one whole
                shutil.rmtree(final)
            os.replace(tmp, final)
    except BaseException as exc:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            previous = latest_checkpoint(root)
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
            raise out_of_space(exc, root, data.step, f"nothing was half-written and {kept}") from exc
        raise
    if data.sharded:
        _all_ranks(None)  # no rank goes on before the checkpoint is in place
    if keep is not None and rank == 0:
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
            for k in sorted(a) if k.startswith(("model.", "text.", *ADAPTER_SHAPE)) and a[k] != b.get(k)]


ADAPTER_SHAPE = ("train.lora.rank", "train.lora.alpha", "train.lora.targets")  # what an adapter's tensors depend on


def check_base_model(directory: Path, saved: Config, meta: dict[str, Any]) -> None:
    """An adapter applies only to the weights it was trained on: model.init_from must still hold them."""
    recorded = meta.get("base_model")
    if not recorded:
        return
    here = interop.fingerprint(saved.model.init_from)
    if here["sha256"] != recorded["sha256"]:
        raise CheckpointError(f"checkpoint {directory} is a LoRA adapter for the base model {recorded['source']} "
                              f"(sha256 {recorded['sha256']}), but model.init_from {here['source']} now holds other "
                              f"weights (sha256 {here['sha256']}); put the base it was trained on back there")


def merge_adapter(data: CheckpointData, map_location: str | torch.device = "cpu") -> None:
    """Fold an adapter checkpoint's adapter into its base, in place: the plain weights any Denoiser loads."""
    base = {k: v.to(map_location) for k, v in interop.load_pretrained(data.config.model).items()}
    factor = lora.scale(data.config.train.lora)
    data.ema = lora.merged_state(base, data.ema, factor)
    if data.model:
        data.model = lora.merged_state(base, data.model, factor)


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


def check_vae(directory: Path, saved: Config, meta: dict[str, Any], expected: Config | None) -> None:
    """A latent-space checkpoint samples only through the VAE it was trained with: another one decodes its latents
    into something else. A missing VAE is the VAE's own message (what to fetch, where)."""
    if expected is not None and uses_vae(expected.vae) != uses_vae(saved.vae):
        space = lambda c: f"latent space (vae.source={c.vae.source})" if uses_vae(c.vae) else "pixel space"  # noqa: E731
        raise CheckpointError(f"checkpoint {directory} was trained in {space(saved)}, this run is in "
                              f"{space(expected)}; use the checkpoint's config.yaml or a fresh run name")
    recorded = meta.get("vae")
    if not uses_vae(saved.vae) or not recorded:
        return
    here = vae.inspect(saved.vae)
    if here.sha256 != recorded["sha256"]:
        raise CheckpointError(f"checkpoint {directory} was trained on the latents of VAE {recorded['source']} "
                              f"(sha256 {recorded['sha256']}), but vae.source {here.source} now holds another "
                              f"(sha256 {here.sha256}); put the VAE it was trained with back there")


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
                    weights_only_ok: bool = True, merge: bool = True) -> CheckpointData:
    """Verify then load. With `expected`, a checkpoint of a different model fails naming each mismatched key.
    The optimizer and RNG state are read only for a resume (`weights_only_ok=False`). A LoRA checkpoint's adapter
    is checked against its base, and folded into it unless resuming or `merge=False` (the adapter alone). A sharded
    checkpoint's model and EMA are assembled whole in this process alone (`consolidate`); its optimizer state stays
    in the shards, which a resume reads with `load_sharded`."""
    directory = Path(directory)
    meta, saved_cfg = open_checkpoint(directory, expected, weights_only_ok)
    if meta.get("layout") == SHARDED:
        return consolidate(directory, meta, saved_cfg, map_location, weights_only_ok)
    weights = load_tensors(directory / "model.pt", map_location)
    data = CheckpointData(step=meta["step"], config=saved_cfg, model=weights["model"], ema=weights["ema"], meta=meta)
    if not weights_only_ok:
        opt = load_tensors(directory / "optimizer.pt", map_location)
        data.optimizer, data.scheduler = opt["optimizer"], opt["scheduler"]
        data.rng = load_tensors(directory / "rng.pt")
    elif merge and "base_model" in meta:
        merge_adapter(data, map_location)
    return data


def open_checkpoint(directory: Path, expected: Config | None, weights_only_ok: bool) -> tuple[dict[str, Any], Config]:
    """Verify a checkpoint and check it belongs to `expected`'s model (each mismatched key named) and to the
    encoders and base weights it was trained with; returns its meta and config."""
    meta = verify(directory)
    saved_cfg = saved_config(directory)
    check_vae(directory, saved_cfg, meta, expected)  # first: pixel against latent space explains every other key
    if expected is not None:
        mismatch = model_config_mismatch(saved_cfg, expected)
        if mismatch:
            raise CheckpointError(f"checkpoint {directory} was trained with a different model:\n  "
                                  + "\n  ".join(mismatch) + "\nUse the checkpoint's config.yaml or a fresh run name.")
    check_text_encoders(directory, saved_cfg, meta)
    check_base_model(directory, saved_cfg, meta)
    if meta.get("weights_only") and not weights_only_ok:
        raise CheckpointError(f"{directory} holds weights only (no optimizer state); it can be sampled from and "
                              f"evaluated, not resumed")
    return meta, saved_cfg


def saved_config(directory: Path) -> Config:
    """The config a verified checkpoint was written with. Its files are intact (the manifest says so), so a key this
    sd3ray does not know means a newer sd3ray wrote it, and a value it refuses, an older one with other rules."""
    try:
        return from_dict(yaml.safe_load((directory / "config.yaml").read_text()))
    except ConfigError as err:
        key, _, problem = str(err).partition(": ")
        if problem.startswith("unknown key"):
            raise CheckpointError(f"checkpoint {directory} was written by a newer sd3ray: its config has {key}, "
                                  f"which this version does not know. Update sd3ray (git pull, or pip install -U) "
                                  f"to load it") from None
        raise CheckpointError(f"checkpoint {directory} holds a config this sd3ray refuses ({err}); load it with "
                              f"the sd3ray that wrote it") from None


def is_sharded_checkpoint(directory: Path) -> bool:
    """Whether `directory` was written by every rank through DCP (its meta.json says so)."""
    meta = Path(directory) / "meta.json"
    return meta.is_file() and read_json(meta, "checkpoint metadata", "resume from an earlier checkpoint",
                                        CheckpointError).get("layout") == SHARDED


def load_sharded(directory: Path, targets: dict[str, Any], expected: Config | None = None) -> CheckpointData:
    """Resume from a sharded checkpoint: verify it, check it is `expected`'s model, then fill `targets` in place
    through DCP: the "model" and "ema" state dicts and the "optimizer"'s "state", keyed by parameter name as
    torch.distributed.checkpoint.state_dict gives them; the optimizer's "param_groups" (its current learning rate)
    are the checkpoint's. A DTensor reads only this rank's slices, from whichever files hold them (any worker count
    resumes); a plain tensor is read whole. A collective where there is a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    directory = Path(directory)
    meta, saved_cfg = open_checkpoint(directory, expected, weights_only_ok=False)
    wanted = {"model": targets["model"], "ema": targets["ema"], "optimizer": {"state": targets["optimizer"]["state"]}}
    try:
        with _alone_is_intended():
            dcp.load(wanted, storage_reader=trusted_reader(directory), no_dist=not _grouped())
    except CheckpointException as exc:
        raise CheckpointError(f"checkpoint {directory} does not fit this model ({_first_failure(exc)}); resume it "
                              f"with the config it was trained with (its config.yaml)") from None
    schedule = load_tensors(directory / SCHEDULE)
    optimizer = {"state": targets["optimizer"]["state"], "param_groups": schedule["param_groups"]}
    return CheckpointData(meta["step"], saved_cfg, targets["model"], targets["ema"], optimizer,
                          schedule["scheduler"], load_tensors(directory / "rng.pt"), meta, sharded=True)


def _first_failure(exc: BaseException) -> str:
    """The first failing rank's error inside DCP's CheckpointException ({rank: (error, trace)}), in one line."""
    first = next(iter(getattr(exc, "failures", {}).values()), (exc, None))[0]
    return (str(first).splitlines() or [type(first).__name__])[0].rstrip(".")


def consolidate(directory: Path, meta: dict[str, Any], saved_cfg: Config, map_location: str | torch.device = "cpu",
                weights_only_ok: bool = True) -> CheckpointData:
    """A sharded checkpoint's model and EMA as whole tensors, assembled in this process from every rank's files
    without a process group: what sampling, evaluation, the MLflow model and exports read. With
    `weights_only_ok=False` also its scheduler and RNG state (the optimizer's stays in the shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    index = trusted_reader(directory).read_metadata()
    whole: dict[str, dict[str, torch.Tensor]] = {"model": {}, "ema": {}}
    for key, item in index.state_dict_metadata.items():
        part, _, name = key.partition(".")
        if part in whole and isinstance(item, TensorStorageMetadata):
            whole[part][name] = torch.empty(item.size, dtype=item.properties.dtype, device=map_location)
    with _alone_is_intended():
        dcp.load(whole, storage_reader=trusted_reader(directory), no_dist=True)
    data = CheckpointData(meta["step"], saved_cfg, whole["model"], whole["ema"], meta=meta)
    if not weights_only_ok:
        data.scheduler = load_tensors(directory / SCHEDULE)["scheduler"]
        data.rng = load_tensors(directory / "rng.pt")
    return data


# what DCP's index (.metadata, a pickle) may name: its own dataclasses, torch sizes, dtypes and layouts, paths
INDEX_TYPES = {"torch.distributed.checkpoint.metadata": "*",
               "torch.distributed.checkpoint.filesystem": {"_StorageInfo"}, "torch.serialization": {"_get_layout"},
               "torch": {"Size"}, "collections": {"OrderedDict"},
               "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}}


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles DCP's index and nothing else: a name outside INDEX_TYPES is refused, so a planted index cannot run
    code (torch's own reader unpickles it unrestricted)."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = INDEX_TYPES.get(module, set())
        found = super().find_class(module, name) if allowed == "*" or name in allowed else None
        if allowed == "*" and not (isinstance(found, type) and found.__module__ == module):
            found = None
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            found = getattr(torch, name)
        if found is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")
        return found


def trusted_reader(directory: Path) -> Any:
    """DCP's file reader for `directory`, reading its index through `_IndexUnpickler`. Tensors DCP reads with
    torch.load(weights_only=True) itself; sd3ray writes no other objects into the shards. (Built on use: importing
    torch.distributed.checkpoint takes most of a second, which runs without shards need not spend.)"""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            path = Path(str(self.path)) / DCP_INDEX
            try:
                with open(path, "rb") as f:
                    metadata = _IndexUnpickler(f).load()
            except pickle.UnpicklingError as exc:
                raise CheckpointError(f"{path} holds something other than a checkpoint index ({exc}). sd3ray never "
                                      f"writes such files and refuses to load them, since unpickling them could run "
                                      f"code. Use a checkpoint sd3ray wrote, from a source you trust.") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(directory)


def upload_checkpoint(local: Path, destination: str, attempts: int = 5, first_wait_s: float = 2.0,
                      names: list[str] | None = None) -> None:
    """Copy a checkpoint directory to `destination` (a folder or a URI such as s3://bucket/runs/NAME/step_...),
    MANIFEST.json last, so that a copy cut short is never taken for a checkpoint. Transient failures (a throttled
    or briefly unreachable object store, beyond its client's own retries) are retried with doubling waits; a full
    destination, or the last failure, is a StorageError. `names`: only these of its files (each rank of a sharded
    checkpoint uploads its own, rank 0 the manifest after all of them)."""
    import time

    import pyarrow.fs as pafs

    from sd3ray.storage import open_folder

    fs, root = open_folder(destination)
    names = sorted(names if names is not None else (p.name for p in local.iterdir() if p.is_file()),
                   key=lambda name: name == MANIFEST)
    wait = first_wait_s
    for attempt in range(1, attempts + 1):
        try:
            fs.create_dir(root, recursive=True)
            for name in names:
                pafs.copy_files(str(local / name), f"{root}/{name}", destination_filesystem=fs)
            return
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                step = int(local.name.removeprefix(STEP_PREFIX)) if local.name.startswith(STEP_PREFIX) else \
                    int(json.loads((local / "meta.json").read_text())["step"])
                raise out_of_space(exc, destination, step, "earlier checkpoints there are untouched") from exc
            if attempt == attempts:
                raise StorageError(f"could not write checkpoint {local.name} to {redact(destination)} after {attempts} "
                                   f"attempts ({exc}); check the storage's reachability and credentials") from exc
            print(f"sd3ray: warning: writing checkpoint {local.name} failed ({exc}); retrying in {wait:g} s "
                  f"({attempt}/{attempts})", flush=True)
            time.sleep(wait)
            wait *= 2
