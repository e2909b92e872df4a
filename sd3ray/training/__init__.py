"""The one training step (`step`), the one loop (`loop`), where it runs (`context`, `local`), and what keeps a run
safe: checkpoints are written through `sd3ray.checkpoint`, one writer per run (`run_lock`), signals (`signals`),
and the machine it runs on (`machine`).
"""
