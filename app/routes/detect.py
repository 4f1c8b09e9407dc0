"""Detection routes: one image, a batch of images, or one image drawn with its boxes."""

from __future__ import annotations

from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, File, Request, UploadFile
from fastapi.responses import Response

from app.routes.deps import (
    Options,
    ServiceDep,
    invalid,
    read_upload,
    require_api_key,
    wait_for_disconnect,
)
from app.schemas import DETECTION_ERRORS, BatchDetectionResult, DetectionResult

router = APIRouter(
    prefix="/v1/detect",
    tags=["detection"],
    dependencies=[Depends(require_api_key)],
    responses=DETECTION_ERRORS,
)

ImageFile = Annotated[UploadFile, File(description="A JPEG, PNG, WebP or BMP image.")]


@router.post("", summary="Detect objects in one image")
async def detect(
    request: Request, service: ServiceDep, options: Options, image: ImageFile
) -> DetectionResult:
    data = await read_upload(image, service.settings.max_upload_bytes)
    [result] = await service.detect([data], options, partial(wait_for_disconnect, request))
    return result


@router.post("/batch", summary="Detect objects in several images at once")
async def detect_batch(
    request: Request,
    service: ServiceDep,
    options: Options,
    images: Annotated[
        list[UploadFile],
        File(
            min_length=1,
            description="Up to YOLOV1_MAX_IMAGES_PER_REQUEST images (repeat the field).",
        ),
    ],
) -> BatchDetectionResult:
    limit = service.settings.max_images_per_request
    if len(images) > limit:
        message = f"{len(images)} images; at most {limit} per request"
        raise invalid(("body", "images"), message, len(images))
    uploads = [await read_upload(image, service.settings.max_upload_bytes) for image in images]
    results = await service.detect(uploads, options, partial(wait_for_disconnect, request))
    return BatchDetectionResult(results=results)


@router.post(
    "/render",
    summary="Draw the detected boxes on the image",
    response_class=Response,
    responses={
        200: {
            "description": "The image as a JPEG, with labelled boxes.",
            "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def render(
    request: Request, service: ServiceDep, options: Options, image: ImageFile
) -> Response:
    data = await read_upload(image, service.settings.max_upload_bytes)
    jpeg = await service.render(data, options, partial(wait_for_disconnect, request))
    return Response(jpeg, media_type="image/jpeg")
