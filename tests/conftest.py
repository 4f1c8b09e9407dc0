"""Shared fixtures for the service tests: a small checkpoint, a running app, a worker gate."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import torch
from asgi_lifespan import LifespanManager

from model import VOC_CLASSES, build_model, save_checkpoint


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random yolov1-tiny checkpoint at 128 px (S = 2) with the VOC classes."""
    torch.manual_seed(0)
    model = build_model("yolov1-tiny", image_size=128)
    path = tmp_path_factory.mktemp("weights") / "w.safetensors"
    return save_checkpoint(path, model, {"class_names": list(VOC_CLASSES)})


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


Serve = Callable[..., AbstractAsyncContextManager[tuple[httpx.AsyncClient, Any]]]


@pytest.fixture
def serve(weights: Path) -> Serve:
    """``async with serve(**settings) as (client, app)``: the real app, lifespan included.

    Settings default to the test checkpoint on the torch backend (no ONNX export to wait for).
    """
    from app.main import create_app
    from app.settings import Settings

    @asynccontextmanager
    async def running(**overrides: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
        settings = Settings(**{"weights": weights, "backend": "torch", **overrides})
        app = create_app(settings)
        async with LifespanManager(app, startup_timeout=180, shutdown_timeout=60) as manager:
            transport = httpx.ASGITransport(manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                yield client, app

    return running


class Gate:
    """Holds the app's inference worker inside ``run_batch`` until ``release()``.

    Records the size of every batch that reaches the worker; ``wait_queued(n)`` returns once
    ``n`` images wait in the queue. Synchronisation is by events, never by sleeping.
    """

    def __init__(self, batcher: Any):
        self.batcher = batcher
        self.batches: list[int] = []
        self._inner_run = batcher.run_batch
        self._inner_submit = batcher.submit
        self._entered = threading.Event()
        self._released = threading.Event()
        self._submitted = anyio.Event()
        batcher.run_batch = self._run
        batcher.submit = self._submit

    def _run(self, items: list) -> list:
        self.batches.append(len(items))
        self._entered.set()
        self._released.wait(timeout=30)
        return self._inner_run(items)

    def _submit(self, items: list) -> list:
        futures = self._inner_submit(items)
        self._submitted.set()
        return futures

    async def wait_held(self) -> None:
        with anyio.fail_after(10):
            await anyio.to_thread.run_sync(self._entered.wait)

    async def wait_queued(self, n: int) -> None:
        with anyio.fail_after(10):
            while self.batcher.queue_depth < n:
                self._submitted = anyio.Event()
                await self._submitted.wait()

    def release(self) -> None:
        self._released.set()

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()  # before the app shuts down, so a failing test cannot hang it


@pytest.fixture
def gate() -> Callable[[Any], Gate]:
    """``with gate(app) as held:`` holds that app's worker until ``held.release()`` or exit."""
    gates: list[Gate] = []

    def hold(app: Any) -> Gate:
        gates.append(Gate(app.state.service.batcher))
        return gates[-1]

    yield hold
    for g in gates:
        g.release()
