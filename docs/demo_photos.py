"""Print what the service answers for each photo in ../shared/images, at its default threshold.

    .venv/bin/python docs/demo_photos.py [--weights W]

Each photo goes through the real app (lifespan, batching, ONNX Runtime) with no query
parameters, as a user's first ``curl -F image=@photo.jpg`` would; the output is the Markdown
table the README shows.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import httpx
from asgi_lifespan import LifespanManager

from app.main import create_app
from app.settings import Settings

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "images"


async def answers(settings: Settings) -> tuple[float, list[tuple[str, list[dict]]]]:
    app = create_app(settings)
    found = []
    async with LifespanManager(app, startup_timeout=600):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://local") as client:
            threshold = (await client.get("/v1/model")).json()["conf_threshold"]
            for path in sorted(IMAGES.glob("*.jpg")):
                files = {"image": (path.name, path.read_bytes(), "image/jpeg")}
                r = await client.post("/v1/detect", files=files)
                r.raise_for_status()
                found.append((path.name, r.json()["detections"]))
    return threshold, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, help="default: the service's default weights")
    args = parser.parse_args()
    settings = Settings(**({"weights": args.weights} if args.weights else {}))
    threshold, found = asyncio.run(answers(settings))
    print(f"default confidence threshold: {threshold:.3f}\n")
    print("| photo | detections (label confidence, box x1,y1-x2,y2 in pixels) |")
    print("|---|---|")
    for name, detections in found:
        cells = [
            f"{d['label']} {d['confidence']:.2f} "
            f"({d['box']['x1']:.0f},{d['box']['y1']:.0f}-{d['box']['x2']:.0f},{d['box']['y2']:.0f})"
            for d in detections
        ]
        print(f"| {name} | {'; '.join(cells) or 'nothing'} |")


if __name__ == "__main__":
    main()
