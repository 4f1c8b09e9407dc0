"""Completing FastAPI's OpenAPI schema where FastAPI cannot know the values or where generated
clients need more than it writes.

The schema is the contract every client is generated from, so it does not depend on the served
checkpoint, and it depends on the settings only where they are the contract: the batch upload's
``maxItems``, the ``servers`` URL, and whether a key is optional.
"""

from __future__ import annotations

from typing import Any

IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp")
DETECTION_UPLOADS = {  # route -> its multipart file field
    "/v1/detect": "image",
    "/v1/detect/batch": "images",
    "/v1/detect/render": "image",
}
LICENSE = {"name": "MIT", "identifier": "MIT"}


def complete_schema(
    schema: dict[str, Any],
    max_images_per_request: int,
    auth_required: bool,
    server_url: str,
) -> dict[str, Any]:
    """Complete ``schema`` in place and return it.

    - Upload fields are ``format: binary`` strings: FastAPI writes ``contentMediaType:
      application/octet-stream`` instead, which contradicts the image types of the multipart
      encoding, and generators such as openapi-python-client then type the field as text (the
      generated client's upload fails with 422).
    - Image parts declare the accepted image types; the batch upload's ``maxItems`` is
      ``max_images_per_request``.
    - Secured operations keep their security schemes and their 401 whatever the settings, so a
      client generated against a service without keys works against one with keys; without
      keys (``auth_required`` false) an empty alternative says that a key is optional. The other
      operations (probes, metrics) declare ``security: []``: open.
    - ``servers`` holds ``server_url``, the base URL generated clients default to.
    """
    schemas = schema["components"]["schemas"]
    _mark_binary(schemas)
    schemas["Body_detect_batch"]["properties"]["images"]["maxItems"] = max_images_per_request
    for path, field in DETECTION_UPLOADS.items():
        form = schema["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]
        form["encoding"] = {field: {"contentType": ", ".join(IMAGE_MEDIA_TYPES)}}
    for operations in schema["paths"].values():
        for operation in operations.values():
            if "security" not in operation:
                operation["security"] = []
            elif not auth_required:
                operation["security"].append({})
    schema["servers"] = [{"url": server_url, "description": "This service (YOLOV1_PUBLIC_URL)."}]
    schema["info"]["license"] = LICENSE
    return schema


def _mark_binary(node: Any) -> None:
    if isinstance(node, dict):
        if node.get("type") == "string" and "contentMediaType" in node:
            del node["contentMediaType"]
            node["format"] = "binary"
        for value in node.values():
            _mark_binary(value)
    elif isinstance(node, list):
        for value in node:
            _mark_binary(value)
