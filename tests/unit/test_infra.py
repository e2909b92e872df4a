"""infra/ checked offline, in this process: KubeRay manifests against KubeRay's own CRD schemas (made strict) and
controller rules, Kubernetes objects with kubernetes-validate --strict, the image's contents and the one Ray version;
every check is shown to catch a planted mistake."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.validate import (
    INFRA,
    all_errors,
    controller_errors,
    core_errors,
    documents,
    kuberay_errors,
    kuberay_schema,
    kustomization_errors,
    pinned_ray_version,
)
from tests.infra_cases import CLUSTER_CONFIGS, CORE_DOCS, KUBERAY_DOCS, needs_crds


def _ids(pairs: list[tuple[Path, dict]]) -> list[str]:
    return [f"{p.relative_to(INFRA)}:{d['kind']}:{d['metadata']['name']}" for p, d in pairs]


@needs_crds
def test_every_manifest_and_cluster_config_is_valid() -> None:
    assert all_errors() == []


def _checked_keys(doc: Any, schema: dict[str, Any], path: tuple = ()) -> Iterator[tuple]:
    """Paths of every key that sits in a mapping whose schema lists its properties (the strict ones)."""
    if isinstance(doc, dict) and "properties" in schema:
        for key, value in doc.items():
            yield (*path, key)
            if key in schema["properties"]:
                yield from _checked_keys(value, schema["properties"][key], (*path, key))
    elif isinstance(doc, list) and "items" in schema:
        for i, item in enumerate(doc):
            yield from _checked_keys(item, schema["items"], (*path, i))


def _rename(doc: dict[str, Any], path: tuple, suffix: str = "x") -> dict[str, Any]:
    mutated = copy.deepcopy(doc)
    parent = mutated
    for step in path[:-1]:
        parent = parent[step]
    parent[f"{path[-1]}{suffix}"] = parent.pop(path[-1])
    return mutated


@needs_crds
@pytest.mark.parametrize(("path", "doc"), KUBERAY_DOCS, ids=_ids(KUBERAY_DOCS))
def test_a_misspelt_key_anywhere_in_a_kuberay_manifest_is_caught(path: Path, doc: dict[str, Any]) -> None:
    keys = [k for k in _checked_keys(doc, kuberay_schema(doc["kind"])) if k != ("kind",)]  # kind picks the schema
    assert len(keys) > 40  # the walk reached deep into pod templates, not just the top level
    missed = [k for k in keys if not any(str(k[-1]) + "x" in e for e in kuberay_errors(_rename(doc, k)))]
    assert missed == []


FREE_FORM = {"labels", "annotations", "matchLabels", "requests", "limits"}  # maps of any keys


def _object_keys(doc: Any, path: tuple = ()) -> Iterator[tuple]:
    """Paths of every key of a Kubernetes object that is a field name, not an entry of a free-form map."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            if path == () and key in ("kind", "apiVersion"):
                continue  # they pick the schema
            yield (*path, key)
            label_selector = key == "selector" and isinstance(value, dict) and "matchLabels" not in value
            if key not in FREE_FORM and not label_selector:
                yield from _object_keys(value, (*path, key))
    elif isinstance(doc, list):
        for i, item in enumerate(doc):
            yield from _object_keys(item, (*path, i))


@pytest.mark.parametrize(("path", "doc"), CORE_DOCS, ids=_ids(CORE_DOCS))
def test_a_misspelt_key_anywhere_in_a_kubernetes_object_is_caught(path: Path, doc: dict[str, Any]) -> None:
    assert core_errors(doc) == []
    keys = list(_object_keys(doc))
    assert keys and [k for k in keys if not core_errors(_rename(doc, k))] == []


@needs_crds
def test_controller_rules_the_schemas_lack() -> None:
    (job,) = documents(INFRA / "k8s/rayjob-train.yaml")
    (cluster,) = documents(INFRA / "k8s/raycluster.yaml")
    assert controller_errors(job) == [] and controller_errors(cluster) == []
    long_name = copy.deepcopy(job)
    long_name["metadata"]["name"] = "sd3ray-" + "x" * 41  # 48 characters
    assert "at most 47 characters" in controller_errors(long_name)[0]
    bad_mode = copy.deepcopy(job)
    bad_mode["spec"]["submissionMode"] = "K8sJob"
    assert "submissionMode" in controller_errors(bad_mode)[0]
    inverted = copy.deepcopy(cluster)
    inverted["spec"]["workerGroupSpecs"][0].update(minReplicas=3, maxReplicas=2, replicas=3)
    assert "minReplicas <= replicas <= maxReplicas" in controller_errors(inverted)[0]
    other_ray = copy.deepcopy(cluster)
    other_ray["spec"]["rayVersion"] = "2.49.0"
    assert "differs from the Ray pinned" in controller_errors(other_ray)[0]


def test_one_ray_version_everywhere() -> None:
    pinned = pinned_ray_version()
    dockerfile = (INFRA / "docker/Dockerfile").read_text()
    assert re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M).group(1) == pinned
    for _, doc in KUBERAY_DOCS:
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert spec["rayVersion"] == pinned
    for path in CLUSTER_CONFIGS:
        assert f"ray.__version__ == '{pinned}'" in path.read_text(), path


def test_kustomization_generates_what_pods_refer_to_and_sets_every_image(tmp_path: Path) -> None:
    import shutil

    assert kustomization_errors(INFRA / "k8s") == []
    copy_root = tmp_path / "k8s"
    shutil.copytree(INFRA / "k8s", copy_root)
    kustomization = yaml.safe_load((copy_root / "kustomization.yaml").read_text())
    kustomization["secretGenerator"] = [g for g in kustomization["secretGenerator"] if g["name"] != "sd3ray-s3"]
    kustomization["images"] = [i for i in kustomization["images"] if i["name"] != "sd3ray-mlflow"]
    kustomization["secretGenerator"] = [g for g in kustomization["secretGenerator"] if g["name"] != "sd3ray-ray-auth"]
    kustomization["resources"] = [r for r in kustomization["resources"] if r != "data-pvc.yaml"] + ["missing.yaml"]
    (copy_root / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    errors = "\n".join(kustomization_errors(copy_root))
    assert "Secret 'sd3ray-s3'" in errors and "image 'sd3ray-mlflow'" in errors and "missing.yaml" in errors
    assert "Secret 'sd3ray-ray-auth'" in errors and "PersistentVolumeClaim 'sd3ray-data'" in errors


def test_the_image_installs_what_the_jobs_need() -> None:
    dockerfile = (INFRA / "docker/Dockerfile").read_text()
    ignore = (INFRA / "docker/Dockerfile.dockerignore").read_text()
    for needed in ("sd3ray", "jobs", "configs", "benchmarks"):
        assert f"COPY --chown=ray:users {needed} {needed}" in dockerfile
        assert f"!{needed}/**" in ignore
    assert re.search(r"^WORKDIR /home/ray/sd3ray$", dockerfile, re.M)
