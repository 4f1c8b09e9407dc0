"""Probes: liveness (the process serves) and readiness (model loaded, batcher running)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.routes.deps import ServiceDep
from app.schemas import NOT_READY, Health

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/live", summary="200 while the process serves")
async def live() -> Health:
    return Health(status="ok")


@router.get(
    "/ready",
    summary="200 once the model is warm; 503 while loading or draining",
    response_model=Health,
    responses=NOT_READY,
)
async def ready(service: ServiceDep) -> Health | JSONResponse:
    if service.ready:
        return Health(status="ok")
    state = "draining" if service.draining else "loading"
    return JSONResponse(
        {"detail": f"not ready: {state}"}, status_code=503, headers={"Retry-After": "1"}
    )
