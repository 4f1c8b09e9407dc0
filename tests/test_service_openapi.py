"""The OpenAPI schema is valid, complete, and the same contract whatever the checkpoint and the
keys (tests/test_generated_clients.py generates clients from it and runs them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import schemathesis
from pydantic import ValidationError

from app.main import create_app
from app.openapi import DETECTION_UPLOADS, IMAGE_MEDIA_TYPES
from app.settings import Settings
from model import build_model, save_checkpoint

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
        for code in ERROR_CODES - {"422"}:  # 422: see the test of validation errors
            content = responses[code]["content"]["application/json"]
            assert content["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
            assert isinstance(content["example"]["detail"], str)
        assert "Retry-After" in responses["503"]["headers"]
        assert operation["security"] == [{"APIKeyHeader": []}, {"HTTPBearer": []}]
    assert "503" in schema["paths"]["/health/ready"]["get"]["responses"]
    assert schema["paths"]["/v1/detect"]["post"]["responses"]["200"]["content"]["application/json"][
        "schema"
    ] == {"$ref": "#/components/schemas/DetectionResult"}


def test_upload_fields_are_binary_images(schema):
    bodies = schema["components"]["schemas"]
    assert bodies["Body_detect"]["properties"]["image"] == {
        "type": "string", "format": "binary", "title": "Image",
        "description": "A JPEG, PNG, WebP or BMP image.",
    }  # fmt: skip
    assert bodies["Body_render"]["properties"]["image"]["format"] == "binary"
    images = bodies["Body_detect_batch"]["properties"]["images"]
    assert images["items"] == {"type": "string", "format": "binary"}  # no octet-stream claim
    assert (images["minItems"], images["maxItems"]) == (1, 8)
    for path, field in DETECTION_UPLOADS.items():
        form = schema["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]
        assert form["encoding"][field]["contentType"].split(", ") == list(IMAGE_MEDIA_TYPES)


def test_validation_errors_are_typed_and_other_errors_are_messages(schema):
    components = schema["components"]["schemas"]
    issue = components["ValidationIssue"]
    assert issue["required"] == ["loc", "msg", "type"]
    assert issue["properties"]["loc"]["items"] == {"anyOf": [{"type": "string"},
                                                             {"type": "integer"}]}  # fmt: skip
    detail = components["ValidationErrorResponse"]["properties"]["detail"]
    assert detail == {"items": {"$ref": "#/components/schemas/ValidationIssue"},
                      "type": "array", "title": "Detail"}  # fmt: skip
    assert components["ErrorResponse"]["properties"]["detail"]["type"] == "string"
    for path in DETECTION_ROUTES:
        content = schema["paths"][path]["post"]["responses"]["422"]["content"]["application/json"]
        assert content["schema"] == {"$ref": "#/components/schemas/ValidationErrorResponse"}
        [example] = content["example"]["detail"]
        assert set(example) >= {"loc", "msg", "type"}
    assert "HTTPValidationError" not in components  # one 422 model, not FastAPI's beside it


def classes_parameter(schema: dict) -> dict:
    [classes] = [p for p in schema["paths"]["/v1/detect"]["post"]["parameters"]
                 if p["name"] == "classes"]  # fmt: skip
    return classes


def test_the_schema_is_the_same_for_every_checkpoint_and_key_setting(weights, tmp_path, schema):
    """What a client is generated from does not depend on the served classes nor on the keys:
    only ``security`` gains an empty alternative (a key is optional) when there are none."""
    other = build_model("yolov1-tiny", num_classes=2, image_size=128)
    other_weights = save_checkpoint(tmp_path / "o.safetensors", other, {"class_names": ["a", "b"]})
    open_schema = create_app(
        Settings(weights=other_weights, max_images_per_request=8)
    ).openapi()  # fmt: skip
    secured = 0
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            open_operation = open_schema["paths"][path][method]
            if operation["security"]:
                secured += 1
                assert operation["security"] == [{"APIKeyHeader": []}, {"HTTPBearer": []}]
                assert open_operation["security"] == [*operation["security"], {}]
                assert "401" in open_operation["responses"]
                open_operation["security"] = operation["security"]
            assert open_operation == operation, (method, path)
    assert secured == len(DETECTION_ROUTES) + 1  # and GET /v1/model
    assert open_schema["components"] == schema["components"]
    assert set(schema["components"]["securitySchemes"]) == {"APIKeyHeader", "HTTPBearer"}
    assert classes_parameter(schema)["schema"]["anyOf"][0] == {
        "type": "array", "items": {"type": "string"}
    }  # fmt: skip
    assert '"enum"' not in json.dumps(schema)  # no per-checkpoint enum anywhere


def test_open_routes_declare_no_security(schema):
    for path in ("/health/live", "/health/ready", "/metrics"):
        assert schema["paths"][path]["get"]["security"] == []


def test_servers_license_and_info(weights, schema):
    assert schema["servers"] == [
        {"url": "http://localhost:8000", "description": "This service (YOLOV1_PUBLIC_URL)."}
    ]
    assert schema["info"]["license"] == {"name": "MIT", "identifier": "MIT"}
    public = Settings(weights=weights, public_url="https://detect.example.org/api/", port=9000)
    assert create_app(public).openapi()["servers"][0]["url"] == "https://detect.example.org/api"
    assert create_app(Settings(weights=weights, port=9000)).openapi()["servers"][0]["url"] == (
        "http://localhost:9000"
    )


def test_a_bad_public_url_stops_the_settings(weights):
    with pytest.raises(ValidationError, match="public_url"):
        Settings(weights=weights, public_url="localhost:8000")
