"""Make docs/example.jpg: a redistributable photo with the boxes /v1/detect/render drew on it.

    .venv/bin/pip install scikit-image && .venv/bin/python docs/render_example.py

The photo is scikit-image's ``data.astronaut()`` (public domain, NASA); it goes through the real
app, lifespan included, with the default weights.
"""

from __future__ import annotations

import argparse
import asyncio
import io
from pathlib import Path

import httpx
from asgi_lifespan import LifespanManager
from PIL import Image
from skimage import data

from app.main import create_app
from app.settings import Settings

OUT = Path(__file__).resolve().parent / "example.jpg"


async def render(confidence: float | None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, format="PNG")
    app = create_app(Settings())
    async with LifespanManager(app, startup_timeout=300):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://local") as client:
            files = {"image": ("astronaut.png", buffer.getvalue(), "image/png")}
            params = {} if confidence is None else {"confidence": confidence}
            boxes = await client.post("/v1/detect", files=files, params=params)
            boxes.raise_for_status()
            for d in boxes.json()["detections"]:
                print(f"{d['label']:<12} {d['confidence']:.2f} {d['box']}")
            response = await client.post("/v1/detect/render", files=files, params=params)
            response.raise_for_status()
            return response.content


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--confidence", type=float, help="default: the service's default")
    args = parser.parse_args()
    image = Image.open(io.BytesIO(asyncio.run(render(args.confidence))))
    image.thumbnail((480, 480))
    image.save(OUT, quality=85)
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
