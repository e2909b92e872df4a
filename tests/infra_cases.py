"""What the infra/ tests of both tiers check: every manifest, its KubeRay and core Kubernetes documents, the `ray
up` configs, and the skip for a machine without KubeRay's CRDs."""

from __future__ import annotations

import pytest

from infra.validate import INFRA, KUBERAY_KINDS, crd_dir, documents

needs_crds = pytest.mark.skipif(
    crd_dir() is None, reason="KubeRay CRDs not found: put KubeRay v1.7.0's ray.io_rayjobs.yaml and "
    "ray.io_rayclusters.yaml (ray-operator/config/crd/bases/) in ../shared/kuberay-crds or $SD3RAY_KUBERAY_CRDS")

MANIFESTS = sorted(p for p in (INFRA / "k8s").rglob("*.yaml") if p.name != "kustomization.yaml")
KUBERAY_DOCS = [(p, d) for p in MANIFESTS for d in documents(p) if d["kind"] in KUBERAY_KINDS]
CORE_DOCS = [(p, d) for p in MANIFESTS for d in documents(p) if d["kind"] not in KUBERAY_KINDS]
CLUSTER_CONFIGS = sorted((INFRA / "cluster").glob("*.yaml"))
