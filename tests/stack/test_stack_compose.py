"""Structural checks of docker-compose.yml, .env.example and the images (`make compose-check` runs the stack for real)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SECRET_VARS = ("POSTGRES_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment must be a mapping"
    return {k: str(v) for k, v in env.items()}


def test_services_present(compose: dict) -> None:
    assert set(compose["services"]) >= {"postgres", "seaweedfs", "create-bucket", "mlflow", "optuna-dashboard",
                                        "worker"}  # fmt: skip


def test_long_running_services_have_healthchecks(compose: dict) -> None:
    for name in ("postgres", "seaweedfs", "mlflow", "optuna-dashboard"):
        check = compose["services"][name]["healthcheck"]
        assert check["test"] and not check.get("disable"), name


@pytest.mark.parametrize(
    ("service", "needs"),
    [("create-bucket", {"seaweedfs": "service_healthy"}),
     ("mlflow", {"postgres": "service_healthy", "create-bucket": "service_completed_successfully"}),
     ("optuna-dashboard", {"postgres": "service_healthy"}),
     ("worker", {"postgres": "service_healthy", "mlflow": "service_healthy"})],
)  # fmt: skip
def test_depends_on_conditions(compose: dict, service: str, needs: dict) -> None:
    deps = compose["services"][service]["depends_on"]
    for dep, condition in needs.items():
        assert deps[dep]["condition"] == condition, (service, dep)


def test_named_volumes_for_data(compose: dict) -> None:
    volumes = compose["volumes"]
    for service, target in (("postgres", "/var/lib/postgresql/data"), ("seaweedfs", "/data")):
        mounts = compose["services"][service]["volumes"]
        named = [m.split(":")[0] for m in mounts if m.split(":")[1] == target]
        assert named and named[0] in volumes, service


def test_secrets_come_from_env_and_are_required(compose: dict) -> None:
    text = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
    for var in SECRET_VARS:
        assert re.search(r"\$\{" + var + r":\?[^}]+\}", text), f"{var} must use ${{{var}:?message}}"
        assert not re.search(r"\$\{" + var + r":-", text), f"{var} must not have a default"
    # every value that looks like a credential is a reference to the environment, never a literal
    for name, service in compose["services"].items():
        for key, value in _env(service).items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY", key):
                assert value.startswith("${") and value.endswith("}"), (name, key)


def test_mlflow_server_settings(compose: dict) -> None:
    svc = compose["services"]["mlflow"]
    env = _env(svc)
    assert svc["build"]["dockerfile"] == "mlflow_server/Dockerfile"
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://")
    userinfo = env["MLFLOW_BACKEND_STORE_URI"].split("://", 1)[1].split("@", 1)[0]
    assert userinfo == "${POSTGRES_USER:-mrigen}", "no password in the backend URI (PGPASSWORD carries it)"
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert "MLFLOW_ALLOWED_HOSTS" in env and "MLFLOW_AUTH_ADMIN_PASSWORD" in env
    assert all(p.startswith("127.0.0.1:") for p in svc["ports"])


def test_worker_reserves_a_gpu_and_runs_tune(compose: dict) -> None:
    svc = compose["services"]["worker"]
    device = svc["deploy"]["resources"]["reservations"]["devices"][0]
    assert "gpu" in device["capabilities"] and device["driver"] == "nvidia"
    dockerfile = (ROOT / svc["build"]["dockerfile"]).read_text(encoding="utf-8")
    assert 'ENTRYPOINT ["python", "-m", "mrigen.tune"]' in dockerfile
    assert _env(svc)["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_dashboard_uses_same_postgres_and_creates_the_optuna_tables_first(compose: dict) -> None:
    svc = compose["services"]["optuna-dashboard"]
    assert _env(svc)["OPTUNA_STORAGE"].endswith("@postgres:5432/optuna")
    script = svc["command"][0]
    # optuna-dashboard opens the storage with skip_table_creation: on a new stack's empty database it crashed
    assert script.index("RDBStorage(") < script.index("exec optuna-dashboard")


def test_file_works_with_compose_v1(compose: dict) -> None:
    """Compose v1.29 (Debian's docker-compose) rejects a top-level `name:`; it was the first error of a real run."""
    assert "name" not in compose and "version" not in compose


@pytest.mark.parametrize(("service", "var", "default"),
                         [("postgres", "POSTGRES_IMAGE", "postgres:17.6"),
                          ("seaweedfs", "SEAWEEDFS_IMAGE", "chrislusf/seaweedfs:4.48"),
                          ("optuna-dashboard", "OPTUNA_DASHBOARD_IMAGE", "ghcr.io/optuna/optuna-dashboard:v0.19.0")])
def test_public_images_are_the_defaults_and_overridable(compose: dict, service: str, var: str, default: str) -> None:
    assert compose["services"][service]["image"] == f"${{{var}:-{default}}}"


def test_built_images_take_their_base_image_as_build_arg(compose: dict) -> None:
    for service, arg in (("mlflow", "PYTHON_IMAGE"), ("create-bucket", "PYTHON_IMAGE"), ("worker", "PYTORCH_IMAGE")):
        build = compose["services"][service]["build"]
        assert arg in build["args"], service
        dockerfile = (ROOT / build["dockerfile"]).read_text(encoding="utf-8")
        assert f"ARG {arg}=" in dockerfile and f"FROM ${{{arg}}}" in dockerfile, service
        # a `# syntax=` line makes BuildKit pull a frontend image from a registry before building anything
        assert "# syntax=" not in dockerfile, service


def test_classic_builder_context_is_an_allow_list() -> None:
    """Compose v1.29 builds with the classic builder, which ignores the per-Dockerfile .dockerignore files."""
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"
    assert not any(ln.startswith("!") and (".env" in ln or ".stack" in ln or ".venv" in ln) for ln in lines)


@pytest.mark.skipif(shutil.which("docker-compose") is None,
                    reason="docker-compose (v1) not installed: `make compose-check` installs it")
def test_docker_compose_v1_accepts_the_file(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "POSTGRES_PASSWORD": "p", "S3_ACCESS_KEY": "a", "S3_SECRET_KEY": "s"}
    done = subprocess.run(["docker-compose", "--project-directory", str(ROOT), "-f", str(ROOT / "docker-compose.yml"),
                           "config", "-q"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    del env["S3_SECRET_KEY"]
    done = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], env=env,
                          capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path)
    assert done.returncode != 0 and "S3_SECRET_KEY" in done.stderr


def test_mrigen_clients_stream_artifacts_through_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """Presigned S3 URLs name the server's internal S3 host (`seaweedfs`); the compose run failed on them."""
    from mrigen.tracking import client

    monkeypatch.delenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "true")      # a user's own choice is kept
    client._prefer_proxied_artifacts()
    assert os.environ["MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD"] == "false"
    assert os.environ["MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD"] == "true"
