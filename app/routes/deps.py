"""Dependencies shared by the routes, as ``Annotated`` aliases.

They are ``async def`` although none awaits: FastAPI runs a plain ``def`` dependency in its
thread pool, which would add a thread hop per dependency to every request.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Query, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app.inference import DetectOptions
from app.service import Service

_api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="One of the keys in YOLOV1_API_KEYS."
)
_bearer = HTTPBearer(auto_error=False, description="One of the keys in YOLOV1_API_KEYS.")


async def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


async def require_api_key(
    service: ServiceDep,
    api_key: Annotated[str | None, Security(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    """401 unless a configured key came as ``X-API-Key`` or ``Authorization: Bearer``."""
    keys = service.settings.api_keys
    if not keys:
        return
    presented = api_key if api_key is not None else bearer.credentials if bearer else None
    if presented is None:
        raise HTTPException(401, "missing API key", headers={"WWW-Authenticate": "Bearer"})
    # Compare against every key, each in constant time, so timing reveals neither key nor index.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented.encode(), key.get_secret_value().encode())
    if not matched:
        raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})


async def detect_options(
    service: ServiceDep,
    confidence: Annotated[
        float | None,
        Query(ge=0, le=1, description="Minimum score; default YOLOV1_CONF_THRESHOLD."),
    ] = None,
    iou: Annotated[
        float | None,
        Query(ge=0, le=1, description="NMS IoU threshold; default YOLOV1_IOU_THRESHOLD."),
    ] = None,
    max_detections: Annotated[
        int, Query(ge=1, le=1000, description="Most detections returned per image.")
    ] = 100,
    classes: Annotated[
        list[str] | None,
        Query(
            description="Class names to keep (repeatable), from `class_names` of GET /v1/model; "
            "all when absent or empty. An unknown name is refused with 422.",
            examples=[["dog", "person"]],
        ),
    ] = None,
) -> DetectOptions:
    try:
        return service.options(confidence, iou, max_detections, classes)
    except ValueError as exc:
        raise invalid(("query", "classes"), str(exc), classes) from None


Options = Annotated[DetectOptions, Depends(detect_options)]


def invalid(loc: tuple[str | int, ...], msg: str, value: object) -> RequestValidationError:
    """A 422 shaped like FastAPI's own: ``{"detail": [{"loc", "msg", "type", "input"}]}``."""
    return RequestValidationError([{"loc": loc, "msg": msg, "type": "value_error", "input": value}])


async def read_upload(upload: UploadFile, limit: int) -> bytes:
    """The file's bytes; 413 when it is over ``limit`` (the body limit caught larger bodies)."""
    if upload.size is not None and upload.size > limit:
        raise HTTPException(413, f"upload is {upload.size} bytes, over the limit of {limit} bytes")
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"upload is over the limit of {limit} bytes")
    return data


async def wait_for_disconnect(request: Request) -> None:
    """Return when the client has gone; the request body must have been read already."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
