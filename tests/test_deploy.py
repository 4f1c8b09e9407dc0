"""The deployment files agree with the service's settings and with each other (no Docker
engine or cluster needed): Dockerfile, .dockerignore, the lock files, compose, nginx, the
Kubernetes manifests (validated offline against the API schemas), and offline /docs."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import anyio
import httpx
import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from app.main import MULTIPART_OVERHEAD_BYTES, create_app
from app.settings import Settings
from model.export import cached_onnx_path, ensure_onnx

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "kubernetes"
DOCKER_STOP_TIMEOUT_S = 10  # `docker stop` / `docker run` default
START_PERIOD_S = int(re.search(r"--start-period=(\d+)s", (REPO / "Dockerfile").read_text())[1])


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


def stages(dockerfile: str) -> dict[str, str]:
    """Stage name -> its instructions."""
    parts = re.split(r"^FROM ", dockerfile, flags=re.M)[1:]
    return {re.match(r"\S+ AS (\S+)", p).group(1): p for p in parts}


# ---- Dockerfile ---------------------------------------------------------------------------


def test_dockerfile_agrees_with_settings(dockerfile, defaults):
    assert re.search(rf"^EXPOSE {defaults.port}$", dockerfile, re.M)
    assert re.search(r'^CMD \["yolov1-serve"\]$', dockerfile, re.M)
    healthcheck = re.search(r"^HEALTHCHECK (.+?)(?<!\\)$", dockerfile, re.M | re.S).group(0)
    assert healthcheck_url(healthcheck) == f":{defaults.port}/health/ready"
    # Plain `docker stop` waits 10 s before SIGKILL: the image's drain fits in it.
    drain = float(re.search(r"YOLOV1_DRAIN_TIMEOUT_S=(\d+)", dockerfile).group(1))
    assert drain < DOCKER_STOP_TIMEOUT_S
    weights = re.search(r"YOLOV1_WEIGHTS=(\S+)", dockerfile).group(1)
    assert weights == "/srv/yolov1/weights/$WEIGHTS", "the baked weights, beside their export"


def test_dockerfile_runs_as_a_user_that_owns_nothing(dockerfile):
    user = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert "chown" not in dockerfile and "--chown" not in dockerfile, "code stays root's"
    assert not re.search(r"^# *syntax=", dockerfile, re.M), "no frontend image to pull"


def test_dockerfile_layers_are_keyed_on_what_they_read(dockerfile):
    parts = stages(dockerfile)
    for name, lock in (("deps-cpu", "serve.txt"), ("deps-cuda", "torch.txt")):
        copies = re.findall(r"^COPY (.+)$", parts[name], re.M)
        assert copies == [f"deploy/requirements/{lock} /tmp/requirements/"], copies
        assert "--require-hashes" in parts[name]
    # The export reads model/ and weights/ only, so edits under app/ reuse it.
    assert re.findall(r"^COPY (\S+)", parts["export"], re.M) == ["model", "weights"]
    # The runtime stage installs a wheel built earlier, without an index.
    runtime = parts["runtime"]
    assert "--no-index" in runtime and " -e " not in runtime
    assert runtime.startswith("deps-${TORCH_VARIANT} AS runtime")
    assert "COPY --from=export /src/weights/*.onnx /srv/yolov1/weights/" in runtime


def test_dockerfile_pins_a_base_image_with_python_3_11(dockerfile):
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.M).group(1)
    assert base.startswith("python:3.11-") and "bookworm" in base


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        regex = re.escape(glob).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, c) for c in candidates):
            ignored = not negate
    return ignored


@pytest.mark.parametrize(
    "path, ignored",
    [
        ("weights/yolov1-voc.safetensors", False),
        ("weights/README.md", False),
        ("app/routes/detect.py", False),
        ("deploy/requirements/serve.txt", False),
        ("pyproject.toml", False),
        ("weights/yolov1-voc.a614749239b94e4f.v2.onnx", True),
        ("weights/run.state.pt", True),
        ("app/__pycache__/main.cpython-311.pyc", True),
        ("tests/test_deploy.py", True),
        (".venv/bin/python", True),
        ("runs/big.safetensors", True),
        ("deploy/kubernetes/deployment.yaml", True),
    ],
)
def test_dockerignore_sends_only_what_the_image_needs(path, ignored):
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert dockerignored(path, patterns) == ignored


def test_dockerignore_keeps_every_path_the_dockerfile_copies(dockerfile):
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    sources = [
        src
        for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile, re.M)
        for src in line.split()[:-1]
    ]
    assert sources, "no COPY found"
    for src in sources:
        path = src.replace("${TORCH_VARIANT}", "cpu")
        assert (REPO / path).exists(), path
        assert not dockerignored(path, patterns), f"{path} is copied but ignored"


# ---- lock files ---------------------------------------------------------------------------


def read_lock(name: str) -> dict[str, str]:
    text = (REPO / "deploy" / "requirements" / name).read_text()
    entries = re.findall(r"^(\S+)==(\S+) \\\n    --hash=sha256:([0-9a-f]{64})$", text, re.M)
    pinned = [line for line in text.splitlines() if line and not line.startswith(("#", " "))]
    assert len(entries) == len(pinned), f"{name}: a line without an exact version and hash"
    return {canonicalize_name(n): v for n, v, _ in entries}


def test_locks_pin_every_dependency_within_pyproject_ranges():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    serve, torch = read_lock("serve.txt"), read_lock("torch.txt")
    assert not set(serve) & set(torch), "a package in both lock files"
    assert not any(n.startswith(("torch", "nvidia", "cuda", "triton")) for n in serve)
    pins = {**serve, **torch}
    for spec in pyproject["project"]["dependencies"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} is not locked"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} outside {spec}"
    build = read_lock("build.txt")
    for spec in pyproject["build-system"]["requires"]:
        req = Requirement(spec)
        assert req.specifier.contains(build[canonicalize_name(req.name)])


# ---- compose ------------------------------------------------------------------------------


def test_every_compose_service_has_a_profile(compose):
    """An unprofiled service would start beside the GPU one and the scaled replicas."""
    for name, service in compose["services"].items():
        assert service.get("profiles"), f"{name} starts with every profile"


def test_compose_service_agrees_with_settings(compose, defaults):
    service = compose["services"]["yolov1"]
    assert f"8000:{defaults.port}" in service["ports"]
    assert (
        healthcheck_url(" ".join(service["healthcheck"]["test"]))
        == f":{defaults.port}/health/ready"
    )
    grace = int(service["stop_grace_period"].rstrip("s"))
    assert grace > float(service["environment"]["YOLOV1_DRAIN_TIMEOUT_S"])
    for name in ("yolov1", "yolov1-gpu", "replica"):
        model = compose["services"][name]
        assert model["read_only"] is True and "/tmp" in model["tmpfs"]
        assert model["cap_drop"] == ["ALL"]
        # Nothing mounted over the baked weights and their export.
        assert not model.get("volumes"), f"{name} mounts {model.get('volumes')}"


def test_compose_gpu_variant_reserves_an_nvidia_gpu(compose):
    gpu = compose["services"]["yolov1-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert gpu["build"]["args"]["TORCH_VARIANT"] == "cuda"
    assert gpu["environment"]["YOLOV1_DEVICE"] == "cuda"


def test_compose_scale_example_follows_its_replicas(compose):
    assert compose["services"]["replica"]["deploy"]["replicas"] > 1
    balancer = compose["services"]["balancer"]
    version = re.search(r"nginx:(\d+)\.(\d+)", balancer["image"]).groups()
    assert tuple(map(int, version)) >= (1, 28), "`resolve` in open-source nginx: 1.27.3+"
    mounts = dict(v.split(":")[:2] for v in balancer["volumes"])
    default = (REPO / mounts["./deploy/nginx/default.conf"].lstrip("/")).name  # default.conf
    conf = (REPO / "deploy" / "nginx" / default).read_text()
    assert re.search(r"^\s*server replica:8000 resolve", conf, re.M)
    assert re.search(r"^resolver 127\.0\.0\.11 ", conf, re.M), "Docker's DNS"
    include = re.search(r"include (\S+);", conf).group(1)
    assert mounts["./deploy/nginx/proxy.conf"] == include


def test_nginx_accepts_what_the_service_accepts_and_outwaits_it(defaults):
    conf = (REPO / "deploy" / "nginx" / "proxy.conf").read_text()
    size = re.search(r"^client_max_body_size (\d+)m;", conf, re.M).group(1)
    largest = defaults.max_images_per_request * defaults.max_upload_bytes
    assert int(size) * 2**20 >= largest + MULTIPART_OVERHEAD_BYTES
    for timeout in re.findall(r"proxy_read_timeout (\d+)s;", conf):
        assert int(timeout) > defaults.request_timeout_s
    # non_idempotent only beside http_503: an error or timeout after sending is never resent.
    for rule in re.findall(r"proxy_next_upstream ([^;]+);", conf):
        if "non_idempotent" in rule.split():
            assert set(rule.split()) == {"http_503", "non_idempotent"}, rule


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
@pytest.mark.parametrize("profile", ["cpu", "gpu", "scale"])
def test_docker_compose_config_validates(profile):
    proc = subprocess.run(
        ["docker-compose", "--profile", profile, "config", "-q"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


# ---- Kubernetes ---------------------------------------------------------------------------


def manifests() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(K8S.glob("*.yaml"))}


@pytest.mark.parametrize("name", sorted(p.name for p in K8S.glob("*.yaml")))
def test_kubernetes_manifest_validates_against_the_api_schema(name):
    validate = pytest.importorskip("kubernetes_validate.utils", reason="pip install -e '.[dev]'")
    doc = manifests()[name]
    if doc["kind"] == "Kustomization":
        for resource in doc["resources"]:
            assert (K8S / resource).is_file(), resource
        return
    validate.validate(doc, validate.latest_version(), strict=True)


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def get_all(app, paths: list[str]) -> dict[str, httpx.Response]:
    """GET each path from the app in process (httpx's ASGI transport: no lifespan runs)."""

    async def run() -> dict[str, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return {path: await client.get(path) for path in paths}

    return anyio.run(run)


@pytest.mark.parametrize("name", ["deployment.yaml", "deployment-gpu.yaml"])
def test_kubernetes_deployment_agrees_with_the_service(name, defaults):
    deployment = manifests()[name]
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    env = {e["name"]: e["value"] for e in c["env"]}
    port = int(env.get("YOLOV1_PORT", defaults.port))
    (named,) = c["ports"]
    assert named["containerPort"] == port
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    kinds = ("startupProbe", "readinessProbe", "livenessProbe")
    # No lifespan: live answers, ready says 503.
    answers = get_all(create_app(defaults), [c[kind]["httpGet"]["path"] for kind in kinds])
    for kind in kinds:
        probe = c[kind]
        assert answers[probe["httpGet"]["path"]].status_code in (200, 503), kind
        assert probe["httpGet"]["port"] == named["name"]
        if kind != "startupProbe":  # a slow answer must not overlap the next probe
            assert probe["timeoutSeconds"] < probe["periodSeconds"], kind
    # The startup budget covers at least the image's health-check start period.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= START_PERIOD_S
    # The grace period covers the preStop pause and the whole drain.
    pause = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = float(env.get("YOLOV1_DRAIN_TIMEOUT_S", defaults.drain_timeout_s))
    assert 0 < pause < pod["terminationGracePeriodSeconds"] - drain
    # The image's user, a read-only root and a writable /tmp.
    assert pod["securityContext"]["runAsUser"] == 10001
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/tmp"}
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
    labels = pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for other in ("service.yaml", "pdb.yaml"):
        doc = manifests()[other]
        selector = doc["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= pod_labels.items(), other


def test_kubernetes_gpu_variant_asks_for_an_nvidia_gpu():
    c = container(manifests()["deployment-gpu.yaml"])
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {e["name"]: e["value"] for e in c["env"]}["YOLOV1_DEVICE"] == "cuda"
    assert c["image"].endswith(":cuda")


def test_kubernetes_service_and_autoscaler_point_at_real_things(defaults):
    docs = manifests()
    (port,) = docs["service.yaml"]["spec"]["ports"]
    assert port["targetPort"] == container(docs["deployment.yaml"])["ports"][0]["name"]
    hpa = docs["hpa.yaml"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == docs["deployment.yaml"]["metadata"]["name"]
    assert hpa["minReplicas"] <= docs["deployment.yaml"]["spec"]["replicas"] <= hpa["maxReplicas"]
    exposed = create_app(defaults).state.metrics
    from prometheus_client import generate_latest

    text = generate_latest(exposed.registry).decode()
    for metric in hpa["metrics"]:
        if metric["type"] == "Pods":
            name = metric["pods"]["metric"]["name"]
            assert re.search(rf"^# TYPE {name} gauge$", text, re.M), f"{name} is not exported"
            target = float(metric["pods"]["target"]["averageValue"])
            assert 0 < target < defaults.max_queue


# ---- what the image relies on -------------------------------------------------------------


def test_docs_load_their_files_from_the_service(defaults):
    app = create_app(defaults)
    for page, answer in get_all(app, ["/docs", "/redoc"]).items():
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']|url: ['"]([^'"]+)['"]""", answer.text)
        urls = [a or b for a, b in urls]
        assert urls and all(u.startswith("/") for u in urls), (page, urls)
        for url, found in get_all(app, urls).items():
            assert found.status_code == 200, url


def test_a_read_only_root_still_finds_the_baked_export(tmp_path, monkeypatch):
    """A read-only root without a tmpfs has no temp dir at all: the export beside the weights
    is found without asking for one, and a missing one fails with a clear OSError."""
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"weights")

    def no_temp_dir() -> str:
        raise FileNotFoundError("No usable temporary directory found")

    def must_not_export(w: Path, out: Path) -> Path:
        raise AssertionError("exported although an export was there")

    monkeypatch.setattr(tempfile, "gettempdir", no_temp_dir)
    baked = cached_onnx_path(weights)
    baked.write_bytes(b"onnx")
    assert ensure_onnx(weights, exporter=must_not_export) == baked
    # Nowhere to write (a directory under a file: unwritable even for root) and no temp dir.
    nowhere = weights / "exports"
    with pytest.raises(OSError, match="no writable place for the ONNX export"):
        ensure_onnx(weights, nowhere, exporter=must_not_export)


def test_console_scripts_exist():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) >= {"yolov1-serve", "yolov1-train", "yolov1-eval"}
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func))
