"""Offline validation of infra/: what a Kubernetes API server, the KubeRay operator and `ray up` would refuse,
checked without any of them.

    python infra/validate.py            # every manifest and cluster config under infra/; exit 1 on any problem

- RayJob / RayCluster: KubeRay's CRD schemas made strict (a misspelt key fails), plus the controller's rules the
  schemas lack (replica bounds, RayJob name length, submissionMode), the pinned Ray version, and each entrypoint:
  the job exists, its parser accepts the flags, and the config and overrides it names load.
- Namespace, PVC, Deployment, StatefulSet, Service: kubernetes-validate --strict.
- kustomization.yaml: every resource exists, every generated ConfigMap/Secret a pod refers to is generated, and
  every image the manifests name is set in `images`.
- `ray up` configs: Ray's own prepare_config + validate_config.

KubeRay's CRDs are read from $SD3RAY_KUBERAY_CRDS, else ../shared/kuberay-crds beside the repository (the
`ray.io_rayjobs.yaml` and `ray.io_rayclusters.yaml` of ray-project/kuberay's ray-operator/config/crd/bases/).
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
INFRA = REPO_ROOT / "infra"
KUBERNETES_VERSION = "1.33.0"
KUBERAY_KINDS = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
CORE_KINDS = {"Namespace", "PersistentVolumeClaim", "Deployment", "StatefulSet", "Service", "ConfigMap", "Secret"}
RAYJOB_NAME_MAX = 47  # KubeRay derives the submitter Job's and the cluster's names from it
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


def crd_dir() -> Path | None:
    """Where KubeRay's CRDs are, or None when neither $SD3RAY_KUBERAY_CRDS nor ../shared/kuberay-crds exists."""
    configured = os.environ.get("SD3RAY_KUBERAY_CRDS")
    found = Path(configured) if configured else REPO_ROOT.parent / "shared" / "kuberay-crds"
    return found if all((found / name).is_file() for name in KUBERAY_KINDS.values()) else None


def pinned_ray_version() -> str:
    """The one Ray version, from pyproject.toml's `ray[...]==X` requirement."""
    text = (REPO_ROOT / "pyproject.toml").read_text()
    found = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', text)
    if not found:
        raise ValueError("pyproject.toml does not pin Ray to one version (ray[...]==X.Y.Z)")
    return found.group(1)


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# ----------------------------------------------------------------------------------------- KubeRay schemas


def strict(schema: Any) -> Any:
    """The schema with `additionalProperties: false` wherever an object lists its properties and does not
    preserve unknown fields: an unknown (misspelt) key then fails instead of being silently dropped."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@functools.cache
def kuberay_schema(kind: str) -> dict[str, Any]:
    """The strict JSON Schema of a `ray.io/v1` kind from its CRD."""
    found = crd_dir()
    if found is None:
        raise FileNotFoundError("KubeRay CRDs not found: set SD3RAY_KUBERAY_CRDS to a folder holding "
                                f"{' and '.join(KUBERAY_KINDS.values())} (KubeRay's ray-operator/config/crd/bases/)")
    crd = yaml.safe_load((found / KUBERAY_KINDS[kind]).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return strict(version["schema"]["openAPIV3Schema"])


def schema_errors(doc: dict[str, Any]) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(kuberay_schema(doc["kind"]))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


def cluster_specs(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = doc.get("spec") or {}
    if doc["kind"] == "RayCluster":
        yield spec
    elif "rayClusterSpec" in spec:
        yield spec["rayClusterSpec"]


def controller_errors(doc: dict[str, Any]) -> list[str]:
    """Rules the KubeRay operator enforces that its CRD schemas do not encode, and the project's version pin."""
    errors = []
    name = (doc.get("metadata") or {}).get("name", "")
    spec = doc.get("spec") or {}
    if doc["kind"] == "RayJob":
        if len(name) > RAYJOB_NAME_MAX:
            errors.append(f"metadata.name: RayJob names are at most {RAYJOB_NAME_MAX} characters ({name!r})")
        mode = spec.get("submissionMode", "K8sJobMode")
        if mode not in SUBMISSION_MODES:
            errors.append(f"spec.submissionMode: {mode!r} is not one of {sorted(SUBMISSION_MODES)}")
        if spec.get("shutdownAfterJobFinishes") is False and "ttlSecondsAfterFinished" in spec:
            errors.append("spec.ttlSecondsAfterFinished only applies with shutdownAfterJobFinishes: true")
    for cluster in cluster_specs(doc):
        if cluster.get("rayVersion") != pinned_ray_version():
            errors.append(f"rayVersion {cluster.get('rayVersion')!r} differs from the Ray pinned in pyproject.toml "
                          f"({pinned_ray_version()})")
        for group in cluster.get("workerGroupSpecs", []):
            low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
            replicas = group.get("replicas", low)
            if not low <= replicas <= high:
                errors.append(f"workerGroupSpecs[{group.get('groupName')}]: need minReplicas <= replicas <= "
                              f"maxReplicas, got {low} <= {replicas} <= {high}")
    return errors


# ------------------------------------------------------------------------------------------- entrypoints


class _Chdir:
    """Jobs resolve their configs from the repository root, as they do when submitted from there."""

    def __init__(self, path: Path) -> None:
        self.path, self.before = path, Path.cwd()

    def __enter__(self) -> None:
        os.chdir(self.path)

    def __exit__(self, *exc: object) -> None:
        os.chdir(self.before)


def load_job(script: Path) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"sd3ray_job_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def entrypoint_errors(entrypoint: str) -> list[str]:
    """The entrypoint runs an existing job whose parser accepts its flags and whose config and overrides load.
    Environment variables (set on the pods) are replaced by placeholder paths."""
    from sd3ray.cli import data_overrides
    from sd3ray.config import ConfigError, load_config
    from sd3ray.sweeps.spec import load_sweep

    words = shlex.split(re.sub(r"\$\{?([A-Z_][A-Z0-9_]*)\}?", r"/placeholder/\1", entrypoint))
    if len(words) < 2 or words[0] not in ("python", "python3") or not words[1].startswith("jobs/"):
        return [f"entrypoint should run `python jobs/NAME.py ...`, got {entrypoint!r}"]
    script = REPO_ROOT / words[1]
    if not script.is_file():
        return [f"entrypoint runs {words[1]}, which does not exist"]
    job = load_job(script)
    if not hasattr(job, "build_parser"):
        return [f"{words[1]} has no build_parser(): its flags cannot be checked"]
    parser = job.build_parser()
    problems: list[str] = []
    parser.error = lambda message: problems.append(message) or (_ for _ in ()).throw(SystemExit(2))
    try:
        args = parser.parse_args(words[2:])
    except SystemExit:
        return [f"{words[1]} refuses the entrypoint's flags: {'; '.join(problems) or 'see --help'}"]
    try:
        with _Chdir(REPO_ROOT):
            if script.stem == "tune":
                load_sweep(args.config, args.overrides, data_overrides(args))
            elif hasattr(args, "config"):
                load_config(args.config, [*args.overrides, *data_overrides(args)])
    except (ConfigError, OSError) as err:
        return [f"{words[1]}: {err}"]
    return []


def kuberay_errors(doc: dict[str, Any]) -> list[str]:
    errors = schema_errors(doc) + controller_errors(doc)
    if doc["kind"] == "RayJob" and "entrypoint" in (doc.get("spec") or {}):
        errors += [f"spec.entrypoint: {e}" for e in entrypoint_errors(doc["spec"]["entrypoint"])]
    return errors


# ------------------------------------------------------------------------------ Kubernetes objects, kustomize


def core_errors(doc: dict[str, Any]) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{'.'.join(map(str, err.path)) or '<root>'}: {err.message}"]
    return []


def images_in(doc: Any) -> Iterator[str]:
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c["image"] for c in value if isinstance(c, dict) and "image" in c)
            else:
                yield from images_in(value)
    elif isinstance(doc, list):
        for item in doc:
            yield from images_in(item)


def references_in(doc: Any) -> Iterator[tuple[str, str]]:
    """(kind, name) of every ConfigMap, Secret and PersistentVolumeClaim a manifest refers to."""
    if isinstance(doc, dict):
        if isinstance(doc.get("authOptions"), dict) and "secretName" in doc["authOptions"]:
            yield "Secret", doc["authOptions"]["secretName"]
        if isinstance(doc.get("persistentVolumeClaim"), dict):
            yield "PersistentVolumeClaim", doc["persistentVolumeClaim"]["claimName"]
        for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret"), ("secretKeyRef", "Secret"),
                          ("configMapKeyRef", "ConfigMap")):
            if isinstance(doc.get(key), dict) and "name" in doc[key]:
                yield kind, doc[key]["name"]
        for value in doc.values():
            yield from references_in(value)
    elif isinstance(doc, list):
        for item in doc:
            yield from references_in(item)


def kustomization_resources(folder: Path) -> tuple[list[str], list[Path]]:
    """Problems with a kustomization's resource list, and the manifest files it includes (recursively)."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    errors, files = [], []
    for entry in kustomization.get("resources", []):
        target = folder / entry
        if target.is_dir() and (target / "kustomization.yaml").is_file():
            sub_errors, sub_files = kustomization_resources(target)
            errors += sub_errors
            files += sub_files
        elif target.is_file():
            files.append(target)
        else:
            errors.append(f"{folder / 'kustomization.yaml'}: resource {entry} does not exist")
    return errors, files


def kustomization_errors(folder: Path) -> list[str]:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    errors, files = kustomization_resources(folder)
    docs = [doc for path in files for doc in documents(path)]
    generated = {("ConfigMap", g["name"]) for g in kustomization.get("configMapGenerator", [])}
    generated |= {("Secret", g["name"]) for g in kustomization.get("secretGenerator", [])}
    generated |= {(doc["kind"], doc["metadata"]["name"]) for doc in docs}
    for kind, name in sorted(set(ref for doc in docs for ref in references_in(doc)) - generated):
        errors.append(f"a manifest refers to {kind} {name!r}, which the kustomization neither generates nor lists")
    if generated and not kustomization.get("generatorOptions", {}).get("disableNameSuffixHash"):
        errors.append("generatorOptions.disableNameSuffixHash must be true: KubeRay pod templates refer to the "
                      "generated names as written, and kustomize does not rewrite references inside custom resources")
    for generator in kustomization.get("secretGenerator", []):
        for env_file in generator.get("envs", []):
            if not (folder / f"{env_file}.example").is_file():
                errors.append(f"secret {generator['name']}: {env_file}.example is missing (the template users fill)")
    named = {image["name"] for image in kustomization.get("images", [])}
    for image in sorted(set(i for doc in docs for i in images_in(doc)) - named):
        if ":" not in image:  # a placeholder name kustomize must replace
            errors.append(f"image {image!r} is not set in kustomization.yaml's images")
    return errors


# ---------------------------------------------------------------------------------------- ray up configs


def ray_up_errors(path: Path) -> list[str]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as err:  # jsonschema's ValidationError and Ray's ValueErrors alike
        return [str(err).splitlines()[0]]
    image = (config.get("docker") or {}).get("image", "")
    if not image:
        return ["docker.image: run sd3ray's image (infra/docker/Dockerfile) so every node has the same Ray"]
    return []


# ---------------------------------------------------------------------------------------------- all of it


def manifest_errors(path: Path) -> list[str]:
    errors = []
    for doc in documents(path):
        kind = doc.get("kind", "?")
        if kind in KUBERAY_KINDS:
            found = kuberay_errors(doc)
        elif kind in CORE_KINDS:
            found = core_errors(doc)
        elif kind == "Kustomization":
            continue
        else:
            found = [f"unexpected kind {kind!r}"]
        errors += [f"{path.relative_to(REPO_ROOT)} ({kind}): {e}" for e in found]
    return errors


def all_errors() -> list[str]:
    errors = []
    for path in sorted((INFRA / "k8s").rglob("*.yaml")):
        if path.name != "kustomization.yaml":
            errors += manifest_errors(path)
    errors += kustomization_errors(INFRA / "k8s")
    for path in sorted((INFRA / "cluster").glob("*.yaml")):
        errors += [f"{path.relative_to(REPO_ROOT)}: {e}" for e in ray_up_errors(path)]
    return errors


def main() -> int:
    if crd_dir() is None:
        print("KubeRay CRDs not found: set SD3RAY_KUBERAY_CRDS (see this file's docstring)", file=sys.stderr)
        return 2
    errors = all_errors()
    for error in errors:
        print(error, file=sys.stderr)
    print(f"infra: {len(errors)} problem(s)" if errors else "infra: every manifest and cluster config is valid")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main())
