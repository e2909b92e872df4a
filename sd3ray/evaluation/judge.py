"""The judge: a frozen MNIST classifier reads generated digits, during training and after it.

Metrics (all from the judge, none from the model being judged):
- prompt accuracy: share of samples the judge reads as the prompted digit (overall, per digit, numeral vs word);
- classifier-FID: Fréchet distance between the judge's penultimate features of samples and of the real test set,
  reported beside its floor (real training images with the prompted digit counts vs the test set, the mean of
  three draws);
- diversity: mean pairwise feature distance within each prompted digit (mode collapse drives it to 0).

The judge is trained once on the real training split, with small random shifts, rotations and scalings so that
it reads digits anywhere in the 32×32 frame, then cached by a hash of its recipe and its training data. The judge of
real MNIST (its 60,000 training digits at 32×32) ships with sd3ray in `weights/`, under the same hash: every machine
judges with the same weights, and the first evaluation does not wait minutes for a training the recipe repeats bit
for bit (`python jobs/train_judge.py --retrain` trains it again and compares).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sd3ray.config import Config
from sd3ray.data.format import ImageSet, from_uint8
from sd3ray.data.prompts import DIGIT_WORDS, is_word_prompt
from sd3ray.errors import DataError
from sd3ray.evaluation.figures import confusion_image
from sd3ray.inference import generate
from sd3ray.model import Denoiser
from sd3ray.storage import is_uri
from sd3ray.tracking.protocol import EVAL_SECONDS, Tracker

JUDGE_VERSION = "cnn-v1"
JUDGE_EPOCHS = 3
FEATURE_DIM = 128


class Judge(nn.Module):
    """(B, 1, 32, 32) in [-1, 1] -> logits (B, 10); `features` gives the 128-d penultimate layer."""

    def __init__(self) -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.body = nn.Sequential(
            conv(1, 16), nn.MaxPool2d(2),  # 16×16
            conv(16, 32), conv(32, 32), nn.MaxPool2d(2),  # 8×8
            conv(32, 64), conv(64, 64), nn.MaxPool2d(2),  # 4×4
            nn.Flatten(), nn.Linear(64 * 16, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(FEATURE_DIM, 10))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random ±3 px shifts, ±12° rotations and 0.85–1.15 scaling, per image."""
    b = x.shape[0]
    angle = (torch.rand(b, generator=generator) * 2 - 1) * (12 * torch.pi / 180)
    scale = 0.85 + 0.3 * torch.rand(b, generator=generator)
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * (3 / 16)  # grid units: 16 px = 1
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False) - 1  # pad with background (−1)


def judge_cache_key(train: ImageSet) -> str:
    digest = hashlib.sha256(f"{JUDGE_VERSION}/{JUDGE_EPOCHS}".encode())
    digest.update(train.images.numpy().tobytes())
    digest.update(train.labels.numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("SD3RAY_CACHE", Path.home() / ".cache" / "sd3ray"))


SHIPPED_DIR = Path(__file__).parent / "weights"  # judges trained by this recipe on public data, named by their key


def shipped_judge_path(train: ImageSet) -> Path | None:
    """The judge that ships with sd3ray for this training set (real MNIST), or None for any other set."""
    path = SHIPPED_DIR / f"judge-{judge_cache_key(train)}.pt"
    return path if path.is_file() else None


def train_judge(train: ImageSet, epochs: int = JUDGE_EPOCHS, batch_size: int = 128, seed: int = 0) -> Judge:
    """Train on the real training digits only; never on generated images."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    judge = Judge()
    steps = epochs * (len(train) // batch_size)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    judge.train()
    started, step = time.perf_counter(), 0
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            x = augment(from_uint8(train.images[index]), generator)
            loss = F.cross_entropy(judge(x), train.labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step % 200 == 0:
                elapsed = time.perf_counter() - started
                print(f"sd3ray: judge: step {step}/{steps} loss {loss.item():.4f} ({elapsed:.0f}s)", flush=True)
    return judge.eval().requires_grad_(False)


def load_judge(train: ImageSet, device: torch.device | str = "cpu") -> Judge:
    """The judge for this training set: the one sd3ray ships (real MNIST), else the cached one, else trained (a few
    minutes on CPU) and cached."""
    if train.images.shape[1:] != (1, 32, 32) or train.labels.min() < 0 or train.labels.max() > 9:
        raise DataError("the judge reads 1×32×32 digits labelled 0–9; set eval.num_samples=0 for other data")
    path = shipped_judge_path(train) or cache_dir() / f"judge-{judge_cache_key(train)}.pt"
    judge = Judge()
    if path.is_file():
        # weights only: a tampered file cannot run code (torch refuses anything but tensors)
        judge.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        print(f"sd3ray: judge: training on {len(train)} real digits (cached afterwards at {path})", flush=True)
        judge = train_judge(train)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(judge.state_dict(), tmp)
        os.replace(tmp, path)  # concurrent first uses each write whole files; the last rename wins
    return judge.eval().requires_grad_(False).to(device)


@torch.no_grad()
def judge_outputs(judge: Judge, images: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 1, 32, 32) -> predicted digits (N,) and penultimate features (N, 128) float64, on CPU."""
    device = next(judge.parameters()).device
    preds, feats = [], []
    for start in range(0, len(images), batch_size):
        f = judge.features(from_uint8(images[start : start + batch_size]).to(device))
        preds.append(judge.head(f).argmax(1).cpu())
        feats.append(f.double().cpu())
    return torch.cat(preds), torch.cat(feats)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2(ΣaΣb)^½) between two feature sets (N, D), in float64."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    vals, vecs = np.linalg.eigh(cov_a)
    sqrt_a = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    # Tr((ΣaΣb)^½) = Tr((Σa^½ Σb Σa^½)^½), and the inner matrix is symmetric PSD
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def mean_pairwise_distance(features: torch.Tensor) -> float:
    if len(features) < 2:
        return 0.0
    d = torch.cdist(features, features)
    return float(d.sum() / (len(features) * (len(features) - 1)))


def per_digit_diversity(features: torch.Tensor, digits: torch.Tensor) -> float:
    """Mean over digits of the mean pairwise feature distance among images of that digit."""
    found = [mean_pairwise_distance(features[digits == d].float()) for d in range(10) if (digits == d).any()]
    return float(np.mean(found))


@dataclass
class JudgeReport:
    metrics: dict[str, float]
    confusion: np.ndarray  # (10, 10): rows prompted digit, columns judged digit
    images: dict[str, np.ndarray] = field(default_factory=dict)


FLOOR_SEEDS = (0, 1, 2)  # one draw's FID at 1,000 images varies by about ±1: the floor is the mean of three


def balanced_draw(labels: torch.Tensor, digits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Indices of real images with exactly the digit counts of `digits` (what the samples were prompted for), each
    digit's drawn without replacement. A draw with the set's natural class counts would add the multinomial noise
    of those counts to the floor's FID, which samples prompted 100 per digit never have."""
    index = []
    for digit, count in enumerate(torch.bincount(digits, minlength=10).tolist()):
        if count:
            pool = torch.nonzero(labels == digit).flatten()
            index.append(pool[torch.randperm(len(pool), generator=generator)[:count]])
    return torch.cat(index)


class Reference:
    """Judge features of the real test set and the floor FID for a given set of prompted digits."""

    def __init__(self, judge: Judge, train: ImageSet, test: ImageSet) -> None:
        self.judge = judge
        _, self.test_features = judge_outputs(judge, test.images)
        self._train_images, self._train_labels = train.images, train.labels
        self._floors: dict[tuple[int, ...], tuple[float, float]] = {}
        first = torch.arange(min(1000, len(test)))
        self.real_diversity = per_digit_diversity(self.test_features[first], test.labels[first])

    def floor(self, digits: torch.Tensor) -> tuple[float, float]:
        """What a perfect generator would score when asked for `digits` (N,): the FID of real training images drawn
        with those digit counts against the test set, as (mean, standard deviation) over FLOOR_SEEDS draws."""
        key = tuple(torch.bincount(digits, minlength=10).tolist())
        if key not in self._floors:
            fids = []
            for seed in FLOOR_SEEDS:
                index = balanced_draw(self._train_labels, digits, torch.Generator().manual_seed(seed))
                _, feats = judge_outputs(self.judge, self._train_images[index])
                fids.append(frechet_distance(feats.numpy(), self.test_features.numpy()))
            self._floors[key] = (float(np.mean(fids)), float(np.std(fids, ddof=1)))
        return self._floors[key]


# The judge's metric keys, named for the order MLflow's UI shows them in: sections by the key's prefix,
# alphabetically, and a section only for a prefix some metric has (images join the section of their prefix).
# `samples/` (prompt accuracy, the cFID ratio, diversity, then the grid and confusion images) follows `loss/`; the
# raw numbers and the per-digit accuracies come after, under `val/`.
HEADLINE_PREFIX, DETAIL_PREFIXES = "samples/", ("val/accuracy_", "val/cfid", "val/diversity")
# the same for every evaluation of a run (they depend on the reference set and the sample count only): MLflow
# tags, in 6 digits
CONSTANT_METRICS = ("val/cfid_floor", "val/cfid_floor_std", "val/diversity_real")


def is_judge_metric(key: str) -> bool:
    return key.startswith((HEADLINE_PREFIX, *DETAIL_PREFIXES)) and key != EVAL_SECONDS


def judge_images(reference: Reference, images: torch.Tensor, digits: torch.Tensor, prompts: list[str]) -> JudgeReport:
    """Score uint8 images that were prompted with `prompts` asking for `digits` (N,)."""
    preds, feats = judge_outputs(reference.judge, images)
    correct = (preds == digits).double()
    word = torch.tensor([is_word_prompt(p) for p in prompts])
    fid = frechet_distance(feats.numpy(), reference.test_features.numpy())
    floor, floor_std = reference.floor(digits)
    metrics = {"samples/accuracy": correct.mean().item(), "val/cfid": fid, "val/cfid_floor": floor,
               "val/cfid_floor_std": floor_std, "samples/cfid_ratio": fid / max(floor, 1e-12)}
    if word.any() and (~word).any():
        metrics["val/accuracy_word"] = correct[word].mean().item()
        metrics["val/accuracy_numeral"] = correct[~word].mean().item()
    for d in range(10):
        if (chosen := digits == d).any():
            metrics[f"val/accuracy_{d}"] = correct[chosen].mean().item()
    metrics["samples/diversity"] = per_digit_diversity(feats, digits)
    metrics["val/diversity_real"] = reference.real_diversity
    confusion = np.zeros((10, 10), np.int64)
    np.add.at(confusion, (digits.numpy(), preds.numpy()), 1)
    return JudgeReport(metrics, confusion)


def eval_prompts(num_samples: int) -> tuple[list[str], torch.Tensor]:
    """num_samples prompts cycling through the digits, alternating numeral and word forms."""
    digits = torch.arange(num_samples) % 10
    prompts = [DIGIT_WORDS[d] if (i // 10) % 2 else str(d) for i, d in enumerate(digits.tolist())]
    return prompts, digits


EVAL_SEED = 777


class SampleJudge:
    """The training-time hook: sample `eval.num_samples` digits from the EMA model and judge them."""

    def __init__(self, cfg: Config, train: ImageSet, test: ImageSet, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.reference = Reference(load_judge(train, device), train, test)
        self.prompts, self.digits = eval_prompts(cfg.eval.num_samples)

    def __call__(self, model: Denoiser, step: int) -> JudgeReport:
        images = generate(model, self.prompts, self.cfg, EVAL_SEED, self.device, batch_size=self.cfg.eval.batch_size)
        report = judge_images(self.reference, images, self.digits, self.prompts)
        report.images["samples/confusion"] = confusion_image(report.confusion, f"step {step}")
        return report


def is_digit_data(images: ImageSet) -> bool:
    return images.captions is None and images.images.shape[1:] == (1, 32, 32)


def judge_settings(model: Denoiser, cfg: Config, reference: Reference, guidances: list[float], steps: list[int],
                      num_samples: int, sampler: str | None = None, seed: int = EVAL_SEED) -> list[dict[str, float]]:
    """Judge metrics for each (guidance, steps) pair, same prompts and noise for all: one row per pair."""
    device = next(model.parameters()).device
    prompts, digits = eval_prompts(num_samples)
    rows = []
    for num_steps in steps:
        for guidance in guidances:
            started = time.perf_counter()
            images = generate(model, prompts, cfg, seed, device, guidance, num_steps, sampler, cfg.eval.batch_size)
            report = judge_images(reference, images, digits, prompts)
            rows.append({"guidance": guidance, "steps": num_steps, **report.metrics,
                         "seconds": time.perf_counter() - started})
            print(f"guidance {guidance:g} steps {num_steps}: accuracy {report.metrics['samples/accuracy']:.3f} "
                  f"FID {report.metrics['val/cfid']:.2f} (floor {report.metrics['val/cfid_floor']:.2f})", flush=True)
    return rows


def markdown_table(rows: list[dict[str, float]]) -> str:
    header = "| guidance | steps | prompt acc | numeral | word | cFID | floor | cFID/floor | diversity (real) | s |"
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        numeral, word = r.get("val/accuracy_numeral", float("nan")), r.get("val/accuracy_word", float("nan"))
        lines.append(f"| {r['guidance']:g} | {r['steps']} | {r['samples/accuracy']:.3f} | {numeral:.3f} | "
                     f"{word:.3f} | {r['val/cfid']:.2f} | {r['val/cfid_floor']:.2f} | {r['samples/cfid_ratio']:.2f} | "
                     f"{r['samples/diversity']:.2f} ({r['val/diversity_real']:.2f}) | {r['seconds']:.0f} |")
    return "\n".join(lines)


def log_judged_settings(tracker: Tracker, cfg: Config, checkpoint: str, step: int, rows: list[dict[str, float]],
                        plot: np.ndarray, files: Path) -> str | None:
    """Log a `judge_settings` table as a new run nested under the checkpoint's training run (when the store has
    it), so the UI shows it beside that run without touching the training run's own metrics or status."""
    meta_path = Path(checkpoint) / "meta.json"
    training_run = json.loads(meta_path.read_text()).get("mlflow_run_id") if meta_path.is_file() else checkpoint
    where = checkpoint if is_uri(str(checkpoint)) or str(checkpoint).startswith("models:/") else \
        str(Path(checkpoint).resolve())
    tags = {"sd3ray.evaluated_checkpoint": where, "sd3ray.evaluated_step": str(step)}
    run_id = tracker.start(cfg, None, tags=tags, run_name=f"evaluate-step{step}", parent_run_id=training_run or "")
    for row in rows:
        prefix = f"eval/g{row['guidance']:g}_s{row['steps']}"
        tracker.log_metrics({f"{prefix}/{k.split('/')[-1]}": v for k, v in row.items() if is_judge_metric(k)},
                            step)
    tracker.log_image("samples/accuracy_vs_guidance", plot, step)
    tracker.log_artifact(files, "evaluation")
    tracker.finish("FINISHED")
    return run_id
