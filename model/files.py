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


def voc_split_file(root: str | Path, split: str) -> Path:
    """Where a Pascal VOC root lists the image ids of ``split``."""
    return Path(root) / "ImageSets" / "Main" / f"{split}.txt"


def voc_split_ids(root: str | Path, split: str) -> list[str] | None:
    """The image ids a Pascal VOC root lists for ``split``; None when it has no such list."""
    split_file = voc_split_file(root, split)
    if not split_file.is_file():
        return None
    # Class-specific lists ("000005 -1") carry a second column; the id is always the first.
    return [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]


def image_files(root: str | Path, split: str) -> list[Path]:
    """The images of a folder, sorted: a Pascal VOC root gives those of its ``split`` (so a
    val split is never trained or calibrated on), any other folder every image file below it."""
    root = Path(root)
    ids = voc_split_ids(root, split)
    if ids is not None:
        return sorted(p for p in (voc_image(root, i) for i in ids) if p is not None)
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
