"""What is being served: the network, its classes, the weights' version and the batching."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app.routes.deps import ServiceDep, require_api_key
from app.schemas import NOT_READY, UNAUTHORIZED, BatchingInfo, ModelInfo, WeightsSource

PRECISIONS = {"float32": "fp32", "float16": "fp16", "int8": "int8"}  # dtype -> precision

router = APIRouter(prefix="/v1", tags=["model"], dependencies=[Depends(require_api_key)])


@router.get("/model", summary="The served model and the batching settings",
            responses={**UNAUTHORIZED, **NOT_READY})  # fmt: skip
async def model_info(service: ServiceDep) -> ModelInfo:
    detector = service.loaded_detector()
    s, meta = service.settings, detector.metadata
    return ModelInfo(
        name=meta["arch"],
        version=detector.version,
        weights=detector.weights.name,
        arch=meta["arch"],
        grid_size=meta["grid_size"],
        boxes_per_cell=meta["boxes_per_cell"],
        num_classes=meta["num_classes"],
        image_size=meta["image_size"],
        class_names=detector.class_names,
        backend=detector.backend.name,
        device=detector.backend.device,
        dtype=detector.backend.dtype,
        precision=PRECISIONS.get(detector.backend.dtype, detector.backend.dtype),
        conf_threshold=service.default_conf_threshold,
        iou_threshold=s.iou_threshold,
        batching=BatchingInfo(
            max_batch_size=service.batcher.max_batch_size,
            lanes=service.batcher.lanes,
            max_images_per_request=s.max_images_per_request,
            max_wait_ms=s.max_wait_ms,
            max_queue=s.max_queue,
            request_timeout_s=s.request_timeout_s,
        ),
        source=WeightsSource(**_source_fields(meta["source"])) if "source" in meta else None,
    )


def _source_fields(source: dict) -> dict:
    return {k: source[k] for k in WeightsSource.model_fields}
