"""deploy/smoke.sh against this machine's Docker: build the image, run it with a read-only root,
wait for healthy, detect on a photo, stop it and check the drain. Skips without a daemon.

The build needs the base image (``BASE_IMAGE``, default python:3.11-slim-bookworm) already
in the local Docker, and a package index: PyPI, or ``PIP_ARGS``/``BUILD_NETWORK`` for a local
one (see the README, "Docker").
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKER = shutil.which("docker")
BASE_IMAGE = os.environ.get("BASE_IMAGE", "python:3.11-slim-bookworm")


def docker(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def daemon() -> None:
    if DOCKER is None:
        pytest.skip("docker is not installed")
    try:
        if docker("info").returncode != 0:
            pytest.skip("no Docker daemon answers (start dockerd)")
    except subprocess.TimeoutExpired:
        pytest.skip("the Docker daemon does not answer")


def smoke(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "deploy" / "smoke.sh")],
        env={**os.environ, **env}, cwd=REPO, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(1600)
def test_smoke_builds_runs_serves_and_drains_the_image(daemon):
    if docker("image", "inspect", BASE_IMAGE).returncode != 0:
        pytest.skip(f"base image {BASE_IMAGE} is not in the local Docker (docker pull it, or "
                    "set BASE_IMAGE to deploy/standin-base.sh's)")  # fmt: skip
    done = smoke(IMAGE="yolov1:smoke-test")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "smoke: OK"
    for step in ("no CUDA library", "runs as uid 10001", "baked ONNX export", "detections",
                 "Swagger UI from the image", "drained and exited 0"):  # fmt: skip
        assert any(step in line for line in lines), step


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smoke_fails_on_an_image_that_does_not_serve(daemon):
    """The script's checks can fail: the bare base image has no service to become healthy."""
    if docker("image", "inspect", BASE_IMAGE).returncode != 0:
        pytest.skip(f"base image {BASE_IMAGE} is not in the local Docker")
    done = smoke(IMAGE=BASE_IMAGE, SKIP_BUILD="1", TORCH_VARIANT="cuda")
    assert done.returncode != 0
    assert "smoke: FAILED" in done.stderr
    assert "smoke: OK" not in done.stdout
