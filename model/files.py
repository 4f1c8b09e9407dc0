"""Which image files a folder offers (no PyTorch here: the service's calibration uses it too)."""

from __future__ import annotations

from pathlib import Path

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def voc_image(root: Path, image_id: str) -> Path | None:
    """``root/JPEGImages/<image_id>.<ext>`` for the first extension that exists, else None."""
    for ext in IMAGE_EXTENSIONS:
        if (path := root / "JPEGImages" / f"{image_id}{ext}").is_file():
            return path
    return None


def image_files(root: str | Path, split: str) -> list[Path]:
    """The images of a folder, sorted: a Pascal VOC root gives those of its ``split`` (so a
    val split is never trained or calibrated on), any other folder every image file below it."""
    root = Path(root)
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if split_file.is_file():
        ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
        return sorted(p for p in (voc_image(root, i) for i in ids) if p is not None)
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
