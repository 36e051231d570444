"""Whole-zoo conformance : every torchvision builder, every placement.

Each builder is one test (its three placements share one build), ordered heaviest first so that
``pytest -n 2`` does not end on a long tail; the few giants (over 250M parameters) take a file
lock so that two workers never hold two of them in memory at once. ``tools/zoo.py`` holds
the checks; docs/zoo.md is the table a full run writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import zoo

DOC = Path(__file__).resolve().parents[1] / "docs" / "zoo.md"


def _weight(name: str) -> int:
    import torchvision

    return next(iter(torchvision.models.get_model_weights(name))).meta["num_params"]


def _passing_in_doc() -> set[str]:
    """Builders all of whose rows pass in the committed docs/zoo.md (the last full sweep)."""
    rows: dict[str, list[bool]] = {}
    for line in DOC.read_text().splitlines() if DOC.exists() else []:
        m = re.match(r"\| `([^`]+)` \|.*\| (pass|fail|not run) \|", line)
        if m:
            rows.setdefault(m.group(1), []).append(m.group(2) == "pass")
    return {name for name, ok in rows.items() if ok and all(ok)}


def _counts_in_doc() -> dict[tuple[str, str], tuple[int, ...]]:
    """(model, placement) -> (found, used, skipped, Δparams, ΔMACs) as the committed table has them."""
    out = {}
    for line in DOC.read_text().splitlines() if DOC.exists() else []:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 9 and cells[0].startswith("`") and cells[4].replace(",", "").isdigit():
            out[(cells[0].strip("`"), cells[2])] = tuple(int(c.replace(",", "") or 0) for c in cells[4:9])  # blank: none
    return out


# CI re-runs every builder that passed the last sweep and weighs under 50M parameters
# (about 5 CPU-minutes); CBAM_ZOO=full re-runs all 109, as `python tools/zoo.py` does.
_FULL = os.environ.get("CBAM_ZOO") == "full"
_PASSING = _passing_in_doc()
BUILDERS = sorted(
    (b for b in zoo.builders() if _FULL or (b[0] in _PASSING and _weight(b[0]) < 50_000_000)),
    key=lambda b: -_weight(b[0]),
)
GIANT = 250_000_000  # parameters: a giant's copies take ~10 GB, so two at once could exhaust a CI machine


@contextlib.contextmanager
def _one_giant_at_a_time(name: str) -> Iterator[None]:
    if _weight(name) < GIANT:
        yield
        return
    with open(Path(tempfile.gettempdir()) / "cbam-zoo-giant.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "task"), BUILDERS, ids=[n for n, _ in BUILDERS])
def test_builder_passes_every_placement(name: str, task: str) -> None:
    with _one_giant_at_a_time(name):
        rows = zoo.run_model(name, task)
    assert [r.placement for r in rows] == list(zoo.PLACEMENTS)
    failed = [f"{r.placement}: {r.reason}" for r in rows if not r.passed]
    assert not failed, "\n".join(failed)
    # the sites and costs are the published table's: a change in them is a change in behaviour,
    # which comes with a regenerated docs/zoo.md (python tools/zoo.py)
    doc = _counts_in_doc()
    for r in rows:
        want = doc.get((name, r.placement))
        got = (r.found, r.used, r.skipped, r.params_delta, r.flops_delta)
        assert want is None or got == want, f"{r.placement}: found/used/skipped/Δparams/ΔMACs {got}, docs/zoo.md {want}"


def test_no_site_row_passes_only_for_the_expected_reason() -> None:
    rows = {r.placement: r for r in zoo.run_model("vit_b_32", "classification")}
    assert rows["block"].passed and rows["block"].used == 0 and rows["block"].found == 12 * 2
    assert "tokens" in rows["block"].reason
    assert rows["conv"].passed and rows["conv"].used == 1  # the patchify conv


def test_stage_sites_of_a_segmentation_model_ignore_its_shape_read() -> None:
    import torchvision

    from cbam_insert import find_sites

    model = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None).eval()
    names = [s.name for s in find_sites(model, after="stage", example_inputs=(torch.rand(1, 3, 64, 64),)) if s.used]
    assert names[0] == "backbone.layer1"  # x.shape[-2:], read first and used last, spans no stage


def test_compare_reports_shape_and_value_differences() -> None:
    a = {"out": torch.zeros(2, 3), "aux": [torch.ones(1)]}
    assert zoo.compare(a, {"out": torch.zeros(2, 3), "aux": [torch.ones(1)]}) is None
    assert "structure differs" in zoo.compare(a, {"out": torch.zeros(2, 4), "aux": [torch.ones(1)]})
    assert "differs by" in zoo.compare(a, {"out": torch.zeros(2, 3), "aux": [torch.ones(1) + 1e-2]})


def test_zoo_doc_is_generated_and_lists_every_builder() -> None:
    text = DOC.read_text()
    assert text.startswith("<!-- generated by `python tools/zoo.py`")
    listed = set(re.findall(r"^\| `([a-z0-9_]+)` \|", text, flags=re.MULTILINE))
    assert listed == {n for n, _ in zoo.builders()}
    for name in listed:
        assert len(re.findall(rf"^\| `{name}` \|", text, flags=re.MULTILINE)) == len(zoo.PLACEMENTS)
