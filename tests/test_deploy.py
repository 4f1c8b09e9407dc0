"""The deployment files agree with the service's settings (no Docker engine is needed)."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib
import yaml

from app.settings import Settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def defaults() -> Settings:
    return Settings(_env_file=None)


def healthcheck_url(text: str) -> str:
    match = re.search(r"http://127\.0\.0\.1:(\d+)(/[\w/]+)", text)
    assert match, "no health check URL found"
    return f":{match.group(1)}{match.group(2)}"


def test_dockerfile_agrees_with_settings(dockerfile, defaults):
    assert len(re.findall(r"^FROM ", dockerfile, re.M)) >= 2, "multi-stage build"
    assert re.search(rf"^EXPOSE {defaults.port}$", dockerfile, re.M)
    assert re.search(r'^CMD \["yolov1-serve"\]$', dockerfile, re.M)
    healthcheck = re.search(r"^HEALTHCHECK (.+?)(?<!\\)$", dockerfile, re.M | re.S).group(0)
    assert healthcheck_url(healthcheck) == f":{defaults.port}/health/ready"
    start_period = int(re.search(r"--start-period=(\d+)s", healthcheck).group(1))
    assert start_period >= 60, "must cover loading, ONNX export and warm-up"
    user = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert user and user[-1] not in ("root", "0")
    assert "TORCH_VARIANT" in dockerfile, "a CUDA image through a build argument"
    # Dependencies are installed before the code is copied, so code edits reuse that layer.
    assert dockerfile.index("pip install -r") < dockerfile.index("COPY app")


def test_console_scripts_exist():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"yolov1-serve", "yolov1-train", "yolov1-eval"}
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func))


def test_compose_service_agrees_with_settings(compose, defaults):
    service = compose["services"]["yolov1"]
    assert f"8000:{defaults.port}" in service["ports"]
    assert (
        healthcheck_url(" ".join(service["healthcheck"]["test"]))
        == f":{defaults.port}/health/ready"
    )
    volumes = service["volumes"]
    assert any(v.endswith(":ro") and "weights" in v for v in volumes), "read-only weights"
    weights = service["environment"]["YOLOV1_WEIGHTS"]
    assert any(weights.startswith(v.split(":")[1]) for v in volumes)
    grace = int(service["stop_grace_period"].rstrip("s"))
    assert grace > float(service["environment"]["YOLOV1_DRAIN_TIMEOUT_S"])


def test_compose_gpu_variant_reserves_an_nvidia_gpu(compose):
    gpu = compose["services"]["yolov1-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert gpu["build"]["args"]["TORCH_VARIANT"] == "cuda"


def test_compose_scale_example_has_a_balancer(compose):
    assert compose["services"]["replica"]["deploy"]["replicas"] > 1
    balancer = compose["services"]["balancer"]
    conf = (REPO / balancer["volumes"][0].split(":")[0]).read_text()
    assert "server replica:8000" in conf


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_config_validates():
    for profile in ([], ["--profile", "gpu"], ["--profile", "scale"]):
        proc = subprocess.run(
            ["docker-compose", *profile, "config", "-q"],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
