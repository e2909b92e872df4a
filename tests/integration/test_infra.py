"""infra/ checked by the tools that run beside it: `ray up` configs with Ray's validation, the jobs the manifests'
entrypoints name, the Dockerfiles with hadolint, YAML with yamllint (each shown to catch a planted mistake), and the
team MLflow server's launcher, run for real."""

from __future__ import annotations

import configparser
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from infra.validate import (
    INFRA,
    documents,
    entrypoint_errors,
    ray_up_errors,
)
from tests.infra_cases import CLUSTER_CONFIGS
from tests.support import (
    REPO_ROOT,
    free_port,
    group_processes,
    http_status,
    start_in_own_session,
    stop_process_group,
    wait_until,
)


def test_entrypoints_must_name_a_job_with_flags_and_config_it_accepts() -> None:
    (job,) = documents(INFRA / "k8s/rayjob-train.yaml")
    assert entrypoint_errors(job["spec"]["entrypoint"]) == []
    assert "does not exist" in entrypoint_errors("python jobs/trian.py --workers 2")[0]
    assert "unrecognized arguments: --wokers" in entrypoint_errors("python jobs/train.py --wokers 2")[0]
    assert "model.widht: unknown key" in entrypoint_errors("python jobs/train.py --set model.widht=64")[0]
    assert "configs/nope.yaml does not exist" in entrypoint_errors("python jobs/train.py --config configs/nope.yaml")[0]
    assert "storage_pth: unknown key" in entrypoint_errors("python jobs/tune.py --set storage_pth=/x")[0]
    assert "python jobs/NAME.py" in entrypoint_errors("bash -c 'python jobs/train.py'")[0]


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=[p.name for p in CLUSTER_CONFIGS])
def test_ray_up_configs_pass_rays_validation_and_a_misspelt_key_fails_it(path: Path, tmp_path: Path) -> None:
    assert ray_up_errors(path) == []
    config = yaml.safe_load(path.read_text())
    for mutate in (lambda c: c.__setitem__("max_worker", c.pop("max_workers")),
                   lambda c: c["available_node_types"]["gpu"].__setitem__("min_worker", 0),
                   lambda c: c["docker"].__setitem__("imag", c["docker"].pop("image"))):
        broken = copy.deepcopy(config)
        mutate(broken)
        planted = tmp_path / path.name
        planted.write_text(yaml.safe_dump(broken))
        assert ray_up_errors(planted), broken


def test_yaml_is_lint_clean_and_a_duplicate_key_is_caught(tmp_path: Path) -> None:
    lint = [sys.executable, "-m", "yamllint", "-s", "-c", str(INFRA / "yamllint.yaml")]
    clean = subprocess.run([*lint, "infra", "configs"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stdout
    (tmp_path / "dup.yaml").write_text("a: 1\na: 2\n")
    assert subprocess.run([*lint, str(tmp_path / "dup.yaml")], capture_output=True).returncode != 0


def test_dockerfiles_pass_hadolint_and_an_unpinned_base_fails_it(tmp_path: Path) -> None:
    hadolint = [str(Path(sys.executable).parent / "hadolint"), "--failure-threshold", "warning"]
    files = [INFRA / "docker/Dockerfile", INFRA / "docker/mlflow.Dockerfile"]
    clean = subprocess.run([*hadolint, *map(str, files)], capture_output=True, text=True)
    assert clean.returncode == 0, clean.stdout
    planted = tmp_path / "Dockerfile"
    planted.write_text(files[0].read_text().replace("FROM rayproject/ray:${RAY_VERSION}-${RAY_VARIANT}",
                                                    "FROM rayproject/ray:latest"))
    assert subprocess.run([*hadolint, str(planted)], capture_output=True).returncode != 0


# ------------------------------------------------------------------------------------- the MLflow launcher


def _request(url: str, auth: tuple[str, str] | None = None, host: str | None = None) -> int:
    import base64

    headers = {"Authorization": "Basic " + base64.b64encode(":".join(auth).encode()).decode()} if auth else {}
    return http_status(url, {**headers, **({"Host": host} if host else {})})


def test_mlflow_launcher_refuses_to_start_without_its_secrets() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run(["bash", str(INFRA / "mlflow/serve.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "set MLFLOW_BACKEND_STORE_URI" in proc.stderr


def _server_env(pgid: int) -> dict[str, str]:
    """The environment of the `mlflow server` process in the launcher's process group."""
    for process, command in group_processes(pgid).items():
        if command[1:3][-1:] == ["server"]:  # python3 .../bin/mlflow server ...
            pairs = (item.partition(b"=") for item in (process / "environ").read_bytes().split(b"\0") if item)
            return {key.decode(): value.decode(errors="replace") for key, _, value in pairs}
    raise AssertionError(f"no mlflow server in process group {pgid}")


def test_mlflow_launcher_serves_with_basic_auth_and_allowed_hosts_only(tmp_path: Path) -> None:
    port = free_port()
    admin = ("admin", "launcher-test-Passw0rd")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"), "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1],
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-key", "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1"}
    server = start_in_own_session(["bash", str(INFRA / "mlflow/serve.sh")], env, tmp_path / "server.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _request(f"{base}/health") == 200, server, tmp_path / "server.log", "serve.sh")
        api = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _request(api) == 401  # no credentials
        assert _request(api, ("admin", "wrong")) == 401
        assert _request(api, admin) == 200
        assert _request(api, admin, host="evil.example") == 403  # DNS rebinding: a Host it does not serve
        client_env = {**env, "MLFLOW_TRACKING_USERNAME": admin[0], "MLFLOW_TRACKING_PASSWORD": admin[1]}
        logged = subprocess.run(
            [sys.executable, "-c", "import mlflow; mlflow.set_tracking_uri('" + base + "'); "
             "r = mlflow.start_run(); mlflow.log_metric('m', 1.0); mlflow.log_text('hi', 'a.txt'); mlflow.end_run(); "
             "print(r.info.run_id)"], env=client_env, capture_output=True, text=True, timeout=300)
        assert logged.returncode == 0, logged.stderr[-2000:]
        # artifacts went through the server (proxied) into the destination, not to a path the client chose
        assert list((tmp_path / "artifacts").rglob("a.txt"))
        # without MLflow's job runners, which would take the pod over its memory limit (serve.sh says why)
        commands = [" ".join(command) for command in group_processes(server.pid).values()]
        assert not [c for c in commands if "huey" in c], commands
        # a password checked once is trusted for a minute, not re-hashed with scrypt on every request: the key as
        # MLflow reads it (mlflow/server/auth/config.py), from the ini file the running server was given
        auth = configparser.ConfigParser()
        auth.read(_server_env(server.pid)["MLFLOW_AUTH_CONFIG_PATH"])
        assert auth.getint("mlflow", "auth_cache_ttl_seconds") == 60
    finally:
        stop_process_group(server)
