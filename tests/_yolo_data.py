"""Tiny Ultralytics datasets made at run time (no download): a few images with rectangles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def _image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    img = (rng.random((size, size, 3)) * 60).astype(np.uint8)
    w, h = rng.integers(size // 4, size // 2, 2)
    x0, y0 = rng.integers(0, size - w), rng.integers(0, size - h)
    img[y0 : y0 + h, x0 : x0 + w] = 200
    return img, ((x0 + w / 2) / size, (y0 + h / 2) / size, w / size, h / size)


def detect_dataset(root: Path, n: int = 4, size: int = 64, segment: bool = False) -> Path:
    """``root/data.yaml`` for a one-class detection (or segmentation) dataset; train = val."""
    rng = np.random.default_rng(0)
    (root / "images" / "train").mkdir(parents=True, exist_ok=True)
    (root / "labels" / "train").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, (cx, cy, w, h) = _image(rng, size)
        Image.fromarray(img).save(root / "images" / "train" / f"{i}.jpg")
        if segment:
            x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
            line = f"0 {x0:.4f} {y0:.4f} {x1:.4f} {y0:.4f} {x1:.4f} {y1:.4f} {x0:.4f} {y1:.4f}"
        else:
            line = f"0 {cx:.4f} {cy:.4f} {w:.4f} {h:.4f}"
        (root / "labels" / "train" / f"{i}.txt").write_text(line + "\n")
    yaml = root / "data.yaml"
    yaml.write_text(f"path: {root}\ntrain: images/train\nval: images/train\nnames:\n  0: box\n")
    return yaml


def classify_dataset(root: Path, n: int = 4, size: int = 32) -> Path:
    """``root`` with train/ and val/ folders of two classes."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for k, name in enumerate(("dark", "bright")):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n // 2):
                img = (rng.random((size, size, 3)) * 100 + 120 * k).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.jpg")
    return root
