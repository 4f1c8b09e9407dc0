"""The OpenAPI schema is valid and complete, and a client generated from it works end to end."""

from __future__ import annotations

import importlib
import io
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import schemathesis
import uvicorn
from PIL import Image

from app.main import create_app
from app.settings import Settings
from model import VOC_CLASSES

ERROR_CODES = {"400", "401", "413", "415", "422", "500", "503", "504"}
DETECTION_ROUTES = ("/v1/detect", "/v1/detect/batch", "/v1/detect/render")


@pytest.fixture(scope="module")
def schema(weights: Path) -> dict:
    return create_app(Settings(weights=weights, api_keys="key", max_images_per_request=8)).openapi()


def test_the_schema_is_valid_openapi(schema):
    assert schema["openapi"].startswith("3.1")
    schemathesis.openapi.from_dict(schema).validate()  # against the OpenAPI 3.1 meta-schema


def test_detection_routes_document_every_error_with_the_error_model(schema):
    for path in DETECTION_ROUTES:
        operation = schema["paths"][path]["post"]
        responses = operation["responses"]
        assert set(responses) >= ERROR_CODES, path
        for code in ERROR_CODES:
            content = responses[code]["content"]["application/json"]
            assert content["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
            assert "detail" in content["example"]
        assert "Retry-After" in responses["503"]["headers"]
        assert operation["security"] == [{"APIKeyHeader": []}, {"HTTPBearer": []}]
    assert "503" in schema["paths"]["/health/ready"]["get"]["responses"]
    assert schema["paths"]["/v1/detect"]["post"]["responses"]["200"]["content"]["application/json"][
        "schema"
    ] == {"$ref": "#/components/schemas/DetectionResult"}


def test_upload_fields_are_binary_images(schema):
    bodies = schema["components"]["schemas"]
    assert bodies["Body_detect"]["properties"]["image"]["format"] == "binary"
    assert bodies["Body_render"]["properties"]["image"]["format"] == "binary"
    images = bodies["Body_detect_batch"]["properties"]["images"]
    assert images["items"]["format"] == "binary"
    assert (images["minItems"], images["maxItems"]) == (1, 8)
    form = schema["paths"]["/v1/detect"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert form["encoding"]["image"]["contentType"].startswith("image/jpeg, image/png")


def test_classes_are_the_models_and_auth_appears_only_with_keys(weights, schema):
    [classes] = [p for p in schema["paths"]["/v1/detect"]["post"]["parameters"]
                 if p["name"] == "classes"]  # fmt: skip
    assert classes["schema"]["anyOf"][0]["items"]["enum"] == [*VOC_CLASSES, ""]  # "": no filter
    open_schema = create_app(Settings(weights=weights)).openapi()
    assert "securitySchemes" not in open_schema["components"]
    for path in DETECTION_ROUTES:
        assert "security" not in open_schema["paths"][path]["post"]
        assert "401" not in open_schema["paths"][path]["post"]["responses"]


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


def jpeg(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 30)).save(out, "JPEG")
    return out.getvalue()


@pytest.mark.timeout(120)
def test_a_generated_client_uploads_and_parses_typed_results(weights, schema, tmp_path):
    if shutil.which("openapi-python-client", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("openapi-python-client is not installed")
    spec = tmp_path / "openapi.json"
    spec.write_text(json.dumps(schema))
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "project_name_override": "yolov1_client",
                "package_name_override": "yolov1_client",
                "post_hooks": [],
                "content_type_overrides": {"image/jpeg": "application/octet-stream"},
            }
        )
    )
    subprocess.run(
        [str(Path(sys.executable).parent / "openapi-python-client"), "generate",
         "--path", str(spec), "--output-path", str(tmp_path / "yolov1_client"),
         "--meta", "none", "--config", str(config), "--fail-on-warning"],
        check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    sys.path.insert(0, str(tmp_path))
    try:
        client_module = importlib.import_module("yolov1_client")
        detect = importlib.import_module("yolov1_client.api.detection.detect")
        detect_batch = importlib.import_module("yolov1_client.api.detection.detect_batch")
        models = importlib.import_module("yolov1_client.models")
        types = importlib.import_module("yolov1_client.types")

        app = create_app(Settings(weights=weights, backend="torch", api_keys="secret"))
        with live_server(app) as url:
            client = client_module.AuthenticatedClient(base_url=url, token="secret")
            image = types.File(io.BytesIO(jpeg(320, 200)), "dog.jpg", "image/jpeg")
            response = detect.sync_detailed(
                client=client, body=models.BodyDetect(image=image), confidence=0.0
            )
            assert response.status_code == 200, response.content
            result = response.parsed
            assert isinstance(result, models.DetectionResult)
            assert (result.image.width, result.image.height) == (320, 200)
            assert result.detections and isinstance(result.detections[0], models.Detection)
            assert 0 <= result.detections[0].box.x1 <= result.detections[0].box.x2 <= 320

            files = [
                types.File(io.BytesIO(jpeg(w, 90)), f"{w}.jpg", "image/jpeg") for w in (60, 70)
            ]
            batch = detect_batch.sync(client=client, body=models.BodyDetectBatch(images=files))
            assert [r.image.width for r in batch.results] == [60, 70]

            gif = types.File(io.BytesIO(b"GIF89a"), "x.gif", "image/gif")
            refused = detect.sync_detailed(client=client, body=models.BodyDetect(image=gif))
            assert refused.status_code == 415
            assert isinstance(refused.parsed, models.ErrorResponse)

            anonymous = client_module.Client(base_url=url)
            denied = detect.sync_detailed(client=anonymous, body=models.BodyDetect(image=image))
            assert denied.status_code == 401
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m.split(".")[0] == "yolov1_client"]:
            del sys.modules[name]
