"""The MLflow Model Registry side of a trained model: which version a `models:/` URI names, the judge's scores
recorded on a version, and promotion by alias (e.g. `champion`) when a version beats the one it points to now."""

from __future__ import annotations

import re
from typing import Any

from sd3ray.errors import Sd3rayError

RANKING_METRIC = "samples/accuracy"  # higher wins; ties go to the lower classifier-FID ratio
TIE_BREAKER = "samples/cfid_ratio"
# versions judged before the metric keys were named for the UI's order carry these tags instead
LEGACY_KEYS = {RANKING_METRIC: "judge/prompt_accuracy", TIE_BREAKER: "judge/fid_ratio"}
VERSION_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


class RegistryError(Sd3rayError):
    """A model URI that names no registered version, or a promotion that cannot be made."""


def model_version(client: Any, model_uri: str) -> tuple[str, str]:
    """(name, version) of `models:/NAME/VERSION` or `models:/NAME@ALIAS`."""
    match = VERSION_URI.match(model_uri)
    if match is None:
        raise RegistryError(f"{model_uri} names no registered model version; use models:/NAME/VERSION or "
                            f"models:/NAME@ALIAS")
    name = match["name"]
    if match["version"]:
        return name, match["version"]
    try:
        return name, client.get_model_version_by_alias(name, match["alias"]).version
    except Exception as exc:
        raise RegistryError(f"{model_uri}: registered model {name} has no alias {match['alias']}") from exc


def record_scores(client: Any, name: str, version: str, scores: dict[str, float], setting: str) -> None:
    """The judge's scores as tags of the model version, with the sampler setting they were measured at."""
    for key, value in scores.items():
        client.set_model_version_tag(name, version, key, f"{value:.6g}")
    client.set_model_version_tag(name, version, "judge/setting", setting)


def beats(candidate: dict[str, str], incumbent: dict[str, str]) -> bool:
    """Whether a version's recorded scores beat another's: higher prompt accuracy, then lower FID ratio."""
    if score(incumbent, RANKING_METRIC) is None:
        return True
    a, b = score(candidate, RANKING_METRIC), score(incumbent, RANKING_METRIC)
    if a != b:
        return a is not None and a > b
    def ratio(tags: dict[str, str]) -> float:
        value = score(tags, TIE_BREAKER)
        return float("inf") if value is None else value

    return ratio(candidate) < ratio(incumbent)


def score(tags: dict[str, str], key: str) -> float | None:
    """A version's recorded score under its key, or the key it was recorded under before; None if unjudged."""
    value = tags.get(key, tags.get(LEGACY_KEYS.get(key, ""), None))
    return None if value is None else float(value)


def promote_if_better(client: Any, name: str, version: str, alias: str) -> tuple[bool, str | None]:
    """Point `alias` at `version` when no version holds it yet or this one's recorded scores beat the holder's
    (judged at the same setting). Returns (moved, the version the alias pointed to before)."""
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except Exception:
        holder = None
    candidate = client.get_model_version(name, version)
    if holder is not None and holder.version != version:
        if holder.tags.get("judge/setting", candidate.tags.get("judge/setting")) != candidate.tags.get("judge/setting"):
            raise RegistryError(f"{name} version {holder.version} ({alias}) was judged at "
                                f"{holder.tags.get('judge/setting')}, version {version} at "
                                f"{candidate.tags.get('judge/setting')}; judge both at one setting to compare them")
        if not beats(candidate.tags, holder.tags):
            return False, holder.version
    client.set_registered_model_alias(name, alias, version)
    return True, holder.version if holder is not None else None
