"""Clients generated from the schema with the configurations in clients/ work against a live
service as generated: openapi-python-client and @hey-api/openapi-ts (compiled with tsc, run with
node). Both are generated once, against a service without keys serving the VOC test checkpoint
(a development server), then used against that service and against one with keys serving a
checkpoint with other classes (a production server). Each answer is checked against the same
request sent with httpx."""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
import yaml
from PIL import Image

from app.main import create_app
from app.settings import Settings
from model import VOC_CLASSES, build_model, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
TYPESCRIPT = REPO / "clients" / "typescript"
PYTHON_CONFIG = REPO / "clients" / "python" / "config.yaml"
API_KEY = "generated-clients-key"
OTHER_CLASSES = ["raccoon", "dog"]  # not the VOC classes the clients were generated against
MIN_NODE = (20, 19)  # @hey-api/openapi-ts 0.95 and @redocly/cli 2 need it

pytestmark = pytest.mark.slow


@contextmanager
def live_server(app) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yield its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:  # polling a startup flag; nothing else to wait on
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def jpeg(width: int, height: int, seed: int = 0) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(out, "JPEG")
    return out.getvalue()


def gif() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "GIF")
    return out.getvalue()


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random yolov1-tiny checkpoint at 128 px whose classes are not VOC's."""
    torch.manual_seed(1)
    model = build_model("yolov1-tiny", num_classes=len(OTHER_CLASSES), image_size=128)
    path = tmp_path_factory.mktemp("other") / "other.safetensors"
    return save_checkpoint(path, model, {"class_names": OTHER_CLASSES})


@pytest.fixture(scope="module")
def dev_schema(weights: Path) -> dict:
    """The schema of a service without keys, the one the clients are generated from."""
    return create_app(Settings(weights=weights)).openapi()


@pytest.fixture(scope="module")
def deployments(weights: Path, other_weights: Path) -> dict[str, Settings]:
    """name -> settings: the development server, and a production server with keys."""
    return {
        "dev": Settings(weights=weights, backend="torch"),
        "prod": Settings(weights=other_weights, backend="torch", api_keys=API_KEY),
    }


def reference(url: str, settings: Settings, method: str, path: str, **kwargs) -> httpx.Response:
    """The request sent with httpx (and the key when the deployment has one)."""
    headers = {"X-API-Key": API_KEY} if settings.api_keys else {}
    return httpx.request(method, url + path, headers=headers, timeout=30, **kwargs)


def options_for(url: str, settings: Settings, image: bytes) -> dict:
    """Query options whose ``classes`` hold a class this deployment finds in ``image`` (random
    weights find few; the top one of an unfiltered request) and the served names that the
    clients' schema never saw."""
    files = {"image": ("a.jpg", image, "image/jpeg")}
    params = {"confidence": 0.0, "max_detections": 1000}
    found = reference(url, settings, "POST", "/v1/detect", files=files, params=params).json()
    served = reference(url, settings, "GET", "/v1/model").json()["class_names"]
    classes = [found["detections"][0]["label"]]
    classes += [name for name in served if name not in VOC_CLASSES and name not in classes]
    return {"confidence": 0.0, "iou": 0.4, "max_detections": 3, "classes": classes}


def without_timing(result: dict) -> dict:
    return {key: value for key, value in result.items() if key != "timing_ms"}


def check_answers(
    url: str, settings: Settings, got: dict, images: list[bytes], options: dict
) -> None:
    """``got`` holds what a generated client parsed, as JSON; compare it with httpx's answers."""
    files = {"image": ("a.jpg", images[0], "image/jpeg")}
    expected = reference(url, settings, "POST", "/v1/detect", files=files, params=options).json()
    assert without_timing(got["detect"]) == without_timing(expected)
    assert 0 < len(got["detect"]["detections"]) <= options["max_detections"]
    assert {d["label"] for d in got["detect"]["detections"]} <= set(options["classes"])

    assert [r["image"] for r in got["batch"]["results"]] == [
        {"width": w, "height": h} for w, h in (Image.open(io.BytesIO(i)).size for i in images)
    ]
    model = reference(url, settings, "GET", "/v1/model").json()
    assert got["model"] == model

    rendered = reference(url, settings, "POST", "/v1/detect/render", files=files, params=options)
    assert got["render"] == rendered.content  # the same JPEG, byte for byte
    assert Image.open(io.BytesIO(got["render"])).size == Image.open(io.BytesIO(images[0])).size

    unsupported = {"image": ("x.gif", gif(), "image/gif")}
    refused = reference(url, settings, "POST", "/v1/detect", files=unsupported).json()
    assert got["unsupported"] == {"status": 415, "message": refused["detail"]}

    [issue] = got["invalid"]["issues"]
    assert got["invalid"]["status"] == 422
    assert issue["loc"] == ["query", "classes"] and issue["type"] == "value_error"
    assert "unicorn" in issue["msg"] and all(name in issue["msg"] for name in model["class_names"])

    if settings.api_keys:
        assert got["anonymous"] == {"status": 401, "message": "missing API key"}
    else:
        assert got["anonymous"] == {"status": 200}


# ---------------------------------------------------------------------- openapi-python-client
def generate_python_client(schema: dict, out: Path) -> None:
    tool = shutil.which("openapi-python-client", path=str(Path(sys.executable).parent))
    if tool is None:
        pytest.skip("openapi-python-client is not installed (pip install -e '.[dev]')")
    spec = out / "openapi.json"
    spec.write_text(json.dumps(schema))
    config = yaml.safe_load(PYTHON_CONFIG.read_text())
    assert config["content_type_overrides"] == {"image/jpeg": "application/octet-stream"}
    subprocess.run(
        [tool, "generate", "--path", str(spec), "--output-path", str(out / "yolov1_client"),
         "--meta", "none", "--config", str(PYTHON_CONFIG), "--fail-on-warning"],
        check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def run_python_client(url: str, images: list[bytes], options: dict) -> dict:
    """Every route through the generated Python client; what it parsed, as JSON."""
    client_module = importlib.import_module("yolov1_client")
    api = "yolov1_client.api"
    detect = importlib.import_module(f"{api}.detection.detect")
    detect_batch = importlib.import_module(f"{api}.detection.detect_batch")
    render = importlib.import_module(f"{api}.detection.render")
    model_info = importlib.import_module(f"{api}.model.model_info")
    models = importlib.import_module("yolov1_client.models")
    types = importlib.import_module("yolov1_client.types")

    def file(data: bytes, name: str = "a.jpg", content_type: str = "image/jpeg"):
        return types.File(io.BytesIO(data), name, content_type)

    def failure(response) -> dict:
        parsed = response.parsed
        if isinstance(parsed, models.ValidationErrorResponse):
            issues = [{"loc": i.loc, "msg": i.msg, "type": i.type_} for i in parsed.detail]
            return {"status": response.status_code, "issues": issues}
        assert isinstance(parsed, models.ErrorResponse), parsed
        return {"status": response.status_code, "message": parsed.detail}

    client = client_module.AuthenticatedClient(base_url=url, token=API_KEY)
    got: dict = {}
    one = detect.sync(client=client, body=models.BodyDetect(image=file(images[0])), **options)
    assert isinstance(one, models.DetectionResult)
    got["detect"] = one.to_dict()
    body = models.BodyDetectBatch(images=[file(data) for data in images])
    got["batch"] = detect_batch.sync(client=client, body=body).to_dict()
    info = model_info.sync(client=client)
    assert isinstance(info, models.ModelInfo)
    got["model"] = info.to_dict()
    drawn = render.sync_detailed(
        client=client, body=models.BodyRender(image=file(images[0])), **options
    )
    assert drawn.status_code == 200 and isinstance(drawn.parsed, types.File)
    got["render"] = drawn.parsed.payload.read()
    refused = detect.sync_detailed(
        client=client, body=models.BodyDetect(image=file(gif(), "x.gif", "image/gif"))
    )
    got["unsupported"] = failure(refused)
    unknown = detect.sync_detailed(
        client=client, body=models.BodyDetect(image=file(images[0])), classes=["unicorn"]
    )
    got["invalid"] = failure(unknown)
    anonymous = detect.sync_detailed(
        client=client_module.Client(base_url=url), body=models.BodyDetect(image=file(images[0]))
    )
    got["anonymous"] = {"status": 200} if anonymous.status_code == 200 else failure(anonymous)
    return got


def test_generated_python_client_works_against_every_deployment(dev_schema, deployments, tmp_path):
    generate_python_client(dev_schema, tmp_path)
    sys.path.insert(0, str(tmp_path))
    images = [jpeg(320, 200, seed=0), jpeg(150, 90, seed=1)]
    try:
        for settings in deployments.values():
            with live_server(create_app(settings)) as url:
                options = options_for(url, settings, images[0])
                got = run_python_client(url, images, options)
                check_answers(url, settings, got, images, options)
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m.split(".")[0] == "yolov1_client"]:
            del sys.modules[name]


# -------------------------------------------------------------------------- @hey-api/openapi-ts
def node_tools() -> Path:
    """clients/typescript with its node_modules installed by ``npm ci``; skip without node."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip(
            "node and npm are needed for the TypeScript client (apt-get install nodejs npm)"
        )
    found = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    version = tuple(int(part) for part in re.findall(r"\d+", found)[:2])
    if version < MIN_NODE:
        pytest.skip(f"node {found} is older than {'.'.join(map(str, MIN_NODE))}, which the "
                    "TypeScript tools need")  # fmt: skip
    installed = TYPESCRIPT / "node_modules" / ".package-lock.json"
    lock = TYPESCRIPT / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        run_node(npm, "ci", "--no-audit", "--no-fund", cwd=TYPESCRIPT)
    return TYPESCRIPT / "node_modules" / ".bin"


def run_node(*args: str, cwd: Path) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def typescript_project(dev_schema, tmp_path_factory) -> Path:
    """A copy of clients/typescript with the client generated from ``dev_schema``, compiled."""
    bin_dir = node_tools()
    project = tmp_path_factory.mktemp("typescript")
    for name in ("package.json", "tsconfig.json", "openapi-ts.config.ts", "src"):
        source = TYPESCRIPT / name
        copy = shutil.copytree if source.is_dir() else shutil.copy
        copy(source, project / name)
    (project / "node_modules").symlink_to(TYPESCRIPT / "node_modules")
    spec = project / "openapi.json"
    spec.write_text(json.dumps(dev_schema))
    env = {**os.environ, "OPENAPI_URL": str(spec), "OPENAPI_OUTPUT": "src/client"}
    done = subprocess.run([str(bin_dir / "openapi-ts")], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    run_node(str(bin_dir / "tsc"), "--noEmit", cwd=project)  # the types hold, examples included
    run_node(str(bin_dir / "tsc"), cwd=project)
    return project


def test_generated_typescript_client_targets_the_schema_server(typescript_project, dev_schema):
    generated = (typescript_project / "src" / "client" / "client.gen.ts").read_text()
    assert f"baseUrl: '{dev_schema['servers'][0]['url']}'" in generated


def test_generated_typescript_client_works_against_every_deployment(
    typescript_project, deployments, tmp_path
):
    images = [jpeg(320, 200, seed=0), jpeg(150, 90, seed=1)]
    paths = []
    for index, data in enumerate(images):
        paths.append(tmp_path / f"{index}.jpg")
        paths[-1].write_bytes(data)
    (tmp_path / "x.gif").write_bytes(gif())
    for name, settings in deployments.items():
        with live_server(create_app(settings)) as url:
            options = options_for(url, settings, images[0])
            plan = {
                "baseUrl": url,
                "apiKey": API_KEY if settings.api_keys else None,
                "images": [str(p) for p in paths],
                "gif": str(tmp_path / "x.gif"),
                "render": str(tmp_path / f"{name}.jpg"),
                "query": options,
            }
            (tmp_path / "plan.json").write_text(json.dumps(plan))
            out = run_node("node", "dist/smoke.js", str(tmp_path / "plan.json"),
                           cwd=typescript_project)  # fmt: skip
            got = json.loads(out)
            got["render"] = (tmp_path / f"{name}.jpg").read_bytes()
            check_answers(url, settings, got, images, options)


@pytest.mark.parametrize("keys", ["", API_KEY])
def test_the_schema_passes_redocly_recommended_lint(weights, keys, tmp_path):
    bin_dir = node_tools()
    spec = tmp_path / "openapi.json"
    spec.write_text(json.dumps(create_app(Settings(weights=weights, api_keys=keys)).openapi()))
    done = subprocess.run([str(bin_dir / "redocly"), "lint", str(spec)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr  # errors fail; warnings do not
    assert "Your API description is valid" in done.stdout + done.stderr
