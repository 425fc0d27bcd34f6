"""Structural checks of docker-compose.yml, .env.example and the server image (Docker is not run here)."""

from __future__ import annotations

import re
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


def test_dashboard_uses_same_postgres(compose: dict) -> None:
    svc = compose["services"]["optuna-dashboard"]
    assert "@postgres:5432/optuna" in svc["command"][0]


def test_env_example_has_no_secret_values() -> None:
    lines = (ROOT / ".env.example").read_text(encoding="utf-8").splitlines()
    values = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    for var in (*SECRET_VARS, "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert values[var] == "", f"{var} must be empty in .env.example"


def test_server_image_pins_mlflow_and_uses_shared_entrypoint() -> None:
    dockerfile = (ROOT / "mlflow_server" / "Dockerfile").read_text(encoding="utf-8")
    version = re.search(r"ARG MLFLOW_VERSION=(\d+)\.(\d+)\.(\d+)", dockerfile)
    assert version and (int(version[1]), int(version[2])) >= (3, 8)
    assert "psycopg" in dockerfile and "boto3" in dockerfile
    assert "COPY mrigen/stack/mlflow_entry.py" in dockerfile
    assert (ROOT / "mrigen" / "stack" / "mlflow_entry.py").exists()
