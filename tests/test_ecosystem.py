"""Ecosystem conformance in CI: a sized subset of ``tools/ecosystem.py`` (docs/ecosystem.md is the full run).

One row per library, the placements that exercise its hardest case: timm's stochastic depth
(block), smp's partial tracing (stage), MONAI 3-D (block), ultralytics' hooks and rewritten
layers (block), transformers' opaque layers (block), efficientnet_pytorch's drop-connect (stage).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("ecosystem_tool", ROOT / "tools" / "ecosystem.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


CASES = [
    ("timm:efficientnet_b0", "block", "timm"),
    ("smp:FPN/resnet18", "stage", "segmentation_models_pytorch"),
    ("monai:SegResNet-3d", "block", "monai"),
    ("ultralytics:yolov8n", "block", "ultralytics"),
    ("ultralytics:yolo11n-cls", "stage", "ultralytics"),
    ("transformers:MobileNetV2", "block", "transformers"),
    ("efficientnet_pytorch:efficientnet-b0", "stage", "efficientnet_pytorch"),
]


@pytest.mark.slow
@pytest.mark.parametrize("model,placement,library", CASES)
def test_ecosystem_row_passes(model: str, placement: str, library: str) -> None:
    pytest.importorskip(library)
    tool = _tool()
    (entry,) = tool.select([model])
    (row,) = tool.run_entry(entry, [placement])
    assert row.status == "pass", row.detail
    assert row.used > 0


def test_ecosystem_doc_has_no_failing_row() -> None:
    doc = ROOT / "docs" / "ecosystem.md"
    rows = re.findall(r"^\| `([^`]+)` \| (\w+) \| (pass|skip|fail) \|", doc.read_text(), re.MULTILINE)
    assert len(rows) > 100
    assert not [r for r in rows if r[2] == "fail"]
