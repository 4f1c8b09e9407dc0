"""Completing FastAPI's OpenAPI schema where FastAPI cannot know the values or where generated
clients need more than it writes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp")
DETECTION_UPLOADS = {  # route -> its multipart file field
    "/v1/detect": "image",
    "/v1/detect/batch": "images",
    "/v1/detect/render": "image",
}


def complete_schema(
    schema: dict[str, Any],
    max_images_per_request: int,
    auth: bool,
    class_names: Sequence[str] | None,
) -> dict[str, Any]:
    """Complete ``schema`` in place and return it.

    - Upload fields get ``format: binary``. FastAPI writes only ``contentMediaType``, and
      generators such as openapi-python-client then type the field as text, so the generated
      client's upload fails with 422.
    - Image parts declare the accepted image types; the batch upload's ``maxItems`` is
      ``max_images_per_request``; ``classes`` enumerates ``class_names`` when they are known.
    - Without ``auth``, no operation claims to need a key or to answer 401.
    """
    schemas = schema["components"]["schemas"]
    _mark_binary(schemas)
    schemas["Body_detect_batch"]["properties"]["images"]["maxItems"] = max_images_per_request
    for path, field in DETECTION_UPLOADS.items():
        operation = schema["paths"][path]["post"]
        form = operation["requestBody"]["content"]["multipart/form-data"]
        form["encoding"] = {field: {"contentType": ", ".join(IMAGE_MEDIA_TYPES)}}
        for parameter in operation["parameters"]:
            if parameter["name"] == "classes" and class_names:
                # "" is accepted too and filters nothing (``?classes=`` from a form or a script).
                parameter["schema"]["anyOf"][0]["items"]["enum"] = [*class_names, ""]
    if not auth:
        schema["components"].pop("securitySchemes", None)
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation.pop("security", None)
                operation["responses"].pop("401", None)
    return schema


def _mark_binary(node: Any) -> None:
    if isinstance(node, dict):
        if node.get("type") == "string" and "contentMediaType" in node:
            node["format"] = "binary"
        for value in node.values():
            _mark_binary(value)
    elif isinstance(node, list):
        for value in node:
            _mark_binary(value)
