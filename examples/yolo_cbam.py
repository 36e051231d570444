"""CBAM in an Ultralytics YOLO, trained, validated, reloaded and exported with Ultralytics' own API.

Builds YOLOv8n from its YAML (random weights; with a real checkpoint use YOLO("yolov8n.pt")),
puts CBAM on the residual branch of every Bottleneck, makes a tiny dataset at run time (a few
images with one bright rectangle each; nothing is downloaded), trains for one epoch, reloads the
best checkpoint with plain YOLO(path) and exports it to ONNX.

    YOLO_OFFLINE=1 python examples/yolo_cbam.py --workdir /tmp/yolo_cbam [--imgsz 64] [--images 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import numpy as np
from PIL import Image


def make_dataset(root: Path, n: int, size: int) -> Path:
    """A one-class detection dataset in Ultralytics' layout; train and val are the same images."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = (rng.random((size, size, 3)) * 60).astype(np.uint8)
        w, h = rng.integers(size // 4, size // 2, 2)
        x0, y0 = rng.integers(0, size - w), rng.integers(0, size - h)
        img[y0 : y0 + h, x0 : x0 + w] = 200
        Image.fromarray(img).save(root / "images" / f"{i}.jpg")
        cx, cy = (x0 + w / 2) / size, (y0 + h / 2) / size
        (root / "labels" / f"{i}.txt").write_text(f"0 {cx:.4f} {cy:.4f} {w / size:.4f} {h / size:.4f}\n")
    yaml = root / "data.yaml"
    yaml.write_text(f"path: {root}\ntrain: images\nval: images\nnames:\n  0: box\n")
    return yaml


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where the dataset and runs go (default: a temp dir)"
    )
    parser.add_argument("--imgsz", type=int, default=64)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()

    from ultralytics import YOLO

    from cbam_insert.integrations.ultralytics import cbam_modules, patch_yolo

    work = args.workdir or Path(tempfile.mkdtemp(prefix="yolo_cbam_"))
    data = make_dataset(work / "data", args.images, args.imgsz)

    yolo = patch_yolo(YOLO("yolov8n.yaml"), after="block", seed=0)
    print(f"patched: {len(cbam_modules(yolo.model))} CBAM modules, e.g. {cbam_modules(yolo.model)[0]}")

    yolo.train(data=str(data), epochs=args.epochs, imgsz=args.imgsz, batch=4, workers=0, amp=False,
               project=str(work / "runs"), name="train", exist_ok=True, plots=False, verbose=False)  # fmt: skip
    best = work / "runs" / "train" / "weights" / "best.pt"
    print(f"trained: {best} holds {len(cbam_modules(yolo.model))} CBAM modules")

    reloaded = YOLO(str(best))  # plain Ultralytics; cbam-insert only has to be installed
    n = len(cbam_modules(reloaded.model))
    print(f"reloaded with YOLO(path): {n} CBAM modules")
    metrics = reloaded.val(data=str(data), imgsz=args.imgsz, batch=4, workers=0, plots=False, verbose=False,
                           project=str(work / "runs"), name="val", exist_ok=True)  # fmt: skip
    print(f"val mAP50-95: {metrics.box.map:.4f}")
    results = reloaded.predict(str(work / "data" / "images" / "0.jpg"), imgsz=args.imgsz, verbose=False)
    print(f"predict (fused): {len(results[0].boxes)} boxes")
    onnx = reloaded.export(format="onnx", imgsz=args.imgsz, simplify=False)
    print(f"exported: {onnx}")
    return 0 if n == len(cbam_modules(yolo.model)) > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
