"""Export a checkpoint's EMA weights for use outside sd3ray (safetensors only).

    python jobs/export.py --checkpoint runs/NAME/checkpoints/step_00003000 --format diffusers --out exported/
    python jobs/export.py --checkpoint runs/NAME/checkpoints/step_00003000 --format diffusers --merge --out merged/
    python jobs/export.py --checkpoint MLFLOW_RUN_ID --format safetensors --out weights.safetensors

--format diffusers writes a folder `SD3Transformer2DModel.from_pretrained(OUT)` loads (the MM-DiT; a byte text
encoder has no diffusers form and stays behind). A LoRA checkpoint exports its adapter as
OUT/pytorch_lora_weights.safetensors, for `transformer.load_lora_adapter(OUT, weight_name=...)` or an SD3
pipeline's `load_lora_weights(OUT)` over the base it was trained on; --merge folds it into that base instead, a
full folder.
--format safetensors writes the Denoiser's EMA state under sd3ray's names as one file (the adapter alone for a
LoRA checkpoint, unless --merge).
--format pipeline writes a folder `StableDiffusion3Pipeline.from_pretrained(OUT)` loads: the transformer (a LoRA
checkpoint merged into its base), the run's VAE and CLIP-L/CLIP-G(/T5) encoders with their tokenizers, and the
flow-matching scheduler at the run's sample.shift (a latent-space run on SD3's encoders; docs/latent.md).

    python jobs/export.py --checkpoint runs/NAME/checkpoints/step_00003000 --format pipeline --out sd3-pipeline/
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir copy

import tempfile

from sd3ray.checkpoint import CheckpointData, load_checkpoint
from sd3ray.cli import add_tracking_args, job_parser, run_job
from sd3ray.inference import resolve_checkpoint
from sd3ray.model import interop, lora
from sd3ray.model.pipeline import save_pipeline


def export(data: CheckpointData, fmt: str, out: Path) -> Path:
    """Write `data`'s EMA weights (merged already, or an adapter) in `fmt` at `out`; returns what was written."""
    cfg = data.config
    if fmt == "safetensors":
        return interop.save_safetensors(data.ema, out if out.suffix == ".safetensors" else out / "model.safetensors")
    mmdit = {k.removeprefix("mmdit."): v for k, v in data.ema.items() if k.startswith("mmdit.")}
    if fmt == "pipeline":
        return save_pipeline(mmdit, cfg, out)
    if lora.is_adapter_state(data.ema):
        return interop.save_diffusers_adapter(lora.adapter_pairs(data.ema), lora.scale(cfg.train.lora), cfg.model,
                                              out, data.meta.get("base_model"))
    return interop.save_diffusers(mmdit, cfg.model, out)


def main() -> int:
    parser = job_parser(__doc__)
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint directory (a folder or a URI such as s3://...) or MLflow run id")
    parser.add_argument("--format", choices=["diffusers", "safetensors", "pipeline"], default="diffusers")
    parser.add_argument("--merge", action="store_true", help="fold a LoRA adapter into its base model")
    parser.add_argument("--out", type=Path, required=True, help="folder (or, for safetensors, a .safetensors file)")
    add_tracking_args(parser, writes=False)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sd3ray-export-") as scratch:
        data = load_checkpoint(resolve_checkpoint(args.checkpoint, args.tracking_uri, Path(scratch)),
                               merge=args.merge or args.format == "pipeline")  # a pipeline holds whole weights
    written = export(data, args.format, args.out)
    print(f"sd3ray: wrote {written} (step {data.step} EMA weights, {args.format})")
    return 0


if __name__ == "__main__":
    run_job(main)
