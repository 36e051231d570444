"""Whole-zoo conformance: every torchvision builder × every placement, checked and tabulated.

For each builder in torchvision's classification, segmentation, detection, video and
optical-flow lists (random weights, small valid inputs) and each placement (``conv``, ``block``,
``stage``) this patches the model with ``init="identity"`` and checks that:

* the patched model runs in eval and in train mode (train: forward and backward), and its
  outputs have the original's structure, shapes and dtypes;
* identity init reproduces the original's outputs in eval mode and in train mode (same seed),
  to 1e-4 relative to the output's scale;
* every original state-dict key is kept with an equal tensor and the new keys are CBAM's;
* with the CBAM gates switched on (so CBAM changes the output), the model saved as ``pt`` and
  as a state dict + recipe loads back (``load_model`` / ``apply_recipe`` on a fresh build) and
  gives the same outputs;
* for classifiers, ``count_params`` and ``count_macs`` of the unpatched model equal torchvision's
  ``meta["num_params"]`` and ``meta["_ops"]`` at the first weights' crop size.

A builder with no site for a placement passes only when that is expected for its family and
every candidate's skip reason is the expected one (``NO_SITE``). Run::

    python tools/zoo.py                          # everything, writes docs/zoo.md
    python tools/zoo.py --models 'resnet*,vit_b_16' --placements block --output -
    python tools/zoo.py --chunk 1/2 --json part1.json --output -
    python tools/zoo.py --merge part1.json part2.json --output docs/zoo.md
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import re
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cbam_insert.api import find_sites, insert_cbam
from cbam_insert.errors import CBAMInsertError
from cbam_insert.modules import CBAM
from cbam_insert.report import count_macs, count_params

__all__ = ["NO_SITE", "Row", "builders", "check_classifier_meta", "main", "render_markdown", "run_model"]

PLACEMENTS = ("conv", "block", "stage")
TASKS = ("classification", "segmentation", "detection", "video", "optical_flow")
TOLERANCE = 1e-4
COMMAND = "python tools/zoo.py"

# (model glob, placement) -> (regex every skip reason must match, why no site is right).
# Checked in order; the first match is the expectation.
NO_SITE: list[tuple[str, str, str, str]] = [
    ("vit_*", "block", r"merge of .*channel axis is \d, not 1|merge of .*channel axis (unknown|lost)",
     "every residual add is on (N, L, D) tokens, not a channels-first map"),
    ("vit_*", "stage", r"", "one patchify conv, then tokens: no stage of conv units or residual blocks"),
    ("swin*", "block", r"merge of .*channel axis|merge of .*not \(N, C",
     "the residual adds are channels-last (N, H, W, C) or token tensors"),
    ("swin*", "stage", r"", "one patchify conv, then channels-last blocks: no channels-first stage"),
    ("mvit_*", "block", r"merge of .*channel axis|merge of .*not \(N, C",
     "the residual adds are on (N, L, D) tokens"),
    ("mvit_*", "stage", r"", "one patchify conv, then tokens: no channels-first stage"),
    ("vgg*", "block", r"", "a plain chain of convs: no residual merge"),
    ("alexnet", "block", r"", "a plain chain of convs: no residual merge"),
    ("squeezenet*", "block", r"", "fire modules concatenate, they do not add: no residual merge"),
    ("densenet*", "block", r"", "dense blocks concatenate, they do not add: no residual merge"),
    ("googlenet", "block", r"", "inception modules concatenate, they do not add: no residual merge"),
    ("inception_v3", "block", r"", "inception modules concatenate, they do not add: no residual merge"),
    ("shufflenet_*", "block", r"", "shuffle units concatenate and shuffle, they do not add: no residual merge"),
    ("s3d", "block", r"", "inception-style 3-D units concatenate: no residual merge"),
    ("ssd300_vgg16", "block", r"", "a VGG backbone: no residual merge"),
]  # fmt: skip


# ----------------------------------------------------------------------------- the model specs


@dataclass
class Spec:
    """How one builder is built and fed: builder kwargs, eval inputs, train-mode arguments."""

    name: str
    task: str
    kwargs: dict[str, Any]
    eval_args: Callable[[], tuple[Any, ...]]
    train_args: Callable[[], tuple[Any, ...]]
    note: str = ""
    backward: bool = True


def builders(tasks: Sequence[str] = TASKS) -> list[tuple[str, str]]:
    """(name, task) for every torchvision builder of the given tasks, in torchvision's order."""
    import torchvision.models as M

    modules = {
        "classification": M,
        "segmentation": M.segmentation,
        "detection": M.detection,
        "video": M.video,
        "optical_flow": M.optical_flow,
    }
    return [(n, t) for t in tasks for n in M.list_models(module=modules[t])]


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _detection_targets(images: list[torch.Tensor], name: str) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    targets = []
    for img in images:
        h, w = img.shape[-2:]
        xy = torch.rand(2, 2, generator=gen) * torch.tensor([w / 2, h / 2])
        boxes = torch.cat([xy, xy + torch.tensor([w / 3, h / 3])], dim=1)
        labels = torch.tensor([1, 1] if "keypoint" in name else [1, 2])  # keypoint R-CNN has one class
        t: dict[str, torch.Tensor] = {"boxes": boxes, "labels": labels}
        if "mask" in name:
            masks = torch.zeros(2, h, w, dtype=torch.uint8)
            for k, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
                masks[k, y0:y1, x0:x1] = 1
            t["masks"] = masks
        if "keypoint" in name:
            kp = torch.rand(2, 17, 2, generator=gen) * (boxes[:, None, 2:] - boxes[:, None, :2]) + boxes[:, None, :2]
            t["keypoints"] = torch.cat([kp, torch.ones(2, 17, 1)], dim=2)
        targets.append(t)
    return targets


def spec_for(name: str, task: str) -> Spec:
    """The zoo's build arguments and inputs for one builder (small inputs where the model allows)."""
    kwargs: dict[str, Any] = {"weights": None}
    if task in ("segmentation", "detection"):
        kwargs["weights_backbone"] = None
    note = ""
    if task == "classification":
        size = train_size = 64
        if name.startswith("vit_"):
            patch = int(re.search(r"_(\d+)$", name).group(1))  # type: ignore[union-attr]
            size = train_size = 2 * patch
            kwargs["image_size"] = size
            note = f"image_size={size}"
        elif name == "maxvit_t":
            size = train_size = 224  # every stage's map must split into 7x7 windows
        elif name == "inception_v3":
            size, train_size = 160, 299  # the train-mode auxiliary head needs its 17x17 map
            note = "train 2×3×299×299"
        s, ts = size, train_size
        return Spec(name, task, kwargs, lambda: (_rand(1, 3, s, s),), lambda: (_rand(2, 3, ts, ts, seed=1),), note)
    if task == "segmentation":
        return Spec(name, task, kwargs, lambda: (_rand(1, 3, 64, 64),), lambda: (_rand(2, 3, 64, 64, seed=1),))
    if task == "video":
        n, t, s = 2, 4, 56
        if name.startswith("mvit"):
            n, t, s = 1, 16, 224  # the builder fixes the positional embedding to 16x224x224; no BN
        elif name == "s3d":
            t, s = 16, 224  # the head's fixed (2, 7, 7) average pool
        elif name.startswith("swin3d"):
            t, s = 2, 28  # one 1x7x7 window after the 2x4x4 patches
        if name.startswith("mvit"):
            note = "train: forward only (a backward at 16×224×224 needs over 8 GB)"
            args = (lambda: (_rand(1, 3, t, s, s),), lambda: (_rand(n, 3, t, s, s, seed=1),))
            return Spec(name, task, kwargs, *args, note, backward=False)
        return Spec(name, task, kwargs, lambda: (_rand(1, 3, t, s, s),), lambda: (_rand(n, 3, t, s, s, seed=1),), note)
    if task == "optical_flow":
        return Spec(
            name, task, kwargs,
            lambda: (_rand(1, 3, 128, 128), _rand(1, 3, 128, 128, seed=2)),
            lambda: (_rand(2, 3, 128, 128, seed=1), _rand(2, 3, 128, 128, seed=3)),
        )  # fmt: skip
    # detection
    if name.startswith("ssd300"):
        sizes = [(300, 300), (300, 300)]
    elif name.startswith("ssdlite"):
        sizes = [(320, 320), (320, 320)]
    else:
        kwargs.update(min_size=128, max_size=160)
        note = "min_size=128, max_size=160"
        if "rcnn" in name:  # fewer proposals and sampled RoIs: the heads dominate the time otherwise
            kwargs.update(rpn_post_nms_top_n_train=200, rpn_post_nms_top_n_test=100, box_batch_size_per_image=64)
            note += ", 200/100 proposals, 64 RoIs per image"
        sizes = [(128, 160), (144, 128)]

    def eval_args() -> tuple[Any, ...]:
        return ([_rand(3, *sizes[0])],)

    def train_args() -> tuple[Any, ...]:
        images = [_rand(3, *hw, seed=1 + i) for i, hw in enumerate(sizes)]
        return (images, _detection_targets(images, name))

    return Spec(name, task, kwargs, eval_args, train_args, note)


def build(spec: Spec, init: bool = True) -> nn.Module:
    """Build the architecture; ``init=False`` skips weight initialisation (a load follows)."""
    import torchvision

    torch.manual_seed(0)
    with warnings.catch_warnings(), contextlib.nullcontext() if init else _no_init():
        warnings.simplefilter("ignore")
        return torchvision.models.get_model(spec.name, **spec.kwargs)


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Make ``torch.nn.init`` a no-op (a strict ``load_state_dict`` overwrites every weight)."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *a, **k: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


# ----------------------------------------------------------------------------- output comparison


def _leaves(out: Any, path: str = "out") -> Iterator[tuple[str, Any]]:
    if isinstance(out, torch.Tensor):
        yield path, out
    elif isinstance(out, dict):
        for k, v in out.items():
            yield from _leaves(v, f"{path}[{k!r}]")
    elif isinstance(out, (list, tuple)):
        yield f"{path}:{type(out).__name__}", len(out)
        for i, v in enumerate(out):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, repr(out) if out is None or isinstance(out, (int, float, str, bool)) else type(out).__name__


def _signature(out: Any) -> list[tuple[str, Any]]:
    return [(p, (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v) for p, v in _leaves(out)]


def compare(ref: Any, got: Any, values: bool = True, tol: float = TOLERANCE) -> str | None:
    """None when ``got`` has ``ref``'s structure, shapes and dtypes (and values, to ``tol`` relative
    to the reference's scale); else what differs."""
    a, b = _signature(ref), _signature(got)
    if a != b:
        diff = next(((x, y) for x, y in zip(a, b) if x != y), (a[len(b) : len(b) + 1], b[len(a) : len(a) + 1]))
        return f"structure differs: {diff[0]} vs {diff[1]}"
    if not values:
        return None
    for (path, x), (_, y) in zip(_leaves(ref), _leaves(got)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
            if isinstance(x, torch.Tensor) and not torch.equal(x, y):
                return f"{path} differs"
            continue
        scale = max(1.0, float(x.detach().abs().max()))
        err = float((x.detach() - y.detach()).abs().max())
        if not err <= tol * scale:
            return f"{path} differs by {err:.3g} (scale {scale:.3g})"
    return None


def _run(model: nn.Module, args: tuple[Any, ...], train: bool, seed: int = 0) -> Any:
    model.train(train)
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(*args)


def _backward(out: Any) -> None:
    loss = sum(v.float().mean() for _, v in _leaves(out) if isinstance(v, torch.Tensor) and v.requires_grad)
    if not isinstance(loss, torch.Tensor):
        raise TypeError("no output requires grad in train mode")
    loss.backward()


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: b.detach().clone() for k, b in model.named_buffers()}


def _restore(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, b in model.named_buffers():
            b.copy_(saved[k])


def gates_on(model: nn.Module) -> None:
    """Turn identity-initialised CBAM modules into working ones (zero parameters become non-zero)."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, CBAM):
                for p in m.parameters():
                    if not p.any():
                        p.copy_(torch.ones_like(p) if p.numel() == 1 else torch.randn(p.shape, generator=gen) * 0.1)


# ----------------------------------------------------------------------------- round trips


def _pt_roundtrip(model: nn.Module, tmp: Path) -> nn.Module:
    from cbam_insert import load_model, save_model

    path = tmp / "model.pt"
    save_model(model, path, format="pt")
    loaded = load_model(path)
    path.unlink()
    return loaded


def _state_dict_roundtrip(model: nn.Module, spec: Spec, tmp: Path) -> nn.Module:
    """Save weights + recipe (safetensors), load them into a fresh build of the architecture."""
    from cbam_insert import load_model, save_model

    path = tmp / "model.safetensors"
    save_model(model, path, format="safetensors")
    loaded = load_model(path, arch=build(spec, init=False))
    path.unlink()
    return loaded


# ----------------------------------------------------------------------------- one model


@dataclass
class Row:
    """One (model, placement) result: what was found and whether every check passed."""

    model: str
    task: str
    placement: str
    inputs: str
    found: int = 0
    used: int = 0
    skipped: int = 0
    params_delta: int = 0
    flops_delta: int = 0
    passed: bool = False
    reason: str = ""
    meta: str = ""
    cpu_s: float = 0.0
    checks: list[str] = field(default_factory=list)


def _no_site_expectation(name: str, placement: str) -> tuple[str, str] | None:
    for glob, p, rx, why in NO_SITE:
        if p == placement and fnmatch.fnmatchcase(name, glob):
            return rx, why
    return None


def _skip_summary(sites: Sequence[Any]) -> str:
    counts = Counter(_short_reason(s.reason) for s in sites if not s.used)
    return "; ".join(f"{n}× {r}" for r, n in counts.most_common(3))


def _short_reason(reason: str) -> str:
    return re.sub(r"\[[\d, ]+\]", "[…]", reason)[:90]


def _describe(args: tuple[Any, ...]) -> str:
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append("×".join(map(str, a.shape)))
        elif isinstance(a, list):
            parts.append("[" + ", ".join("×".join(map(str, t.shape)) for t in a) + "]")
    return ", ".join(parts)


def check_classifier_meta(name: str) -> str:
    """An empty string when the report's parameter and MAC counts of the unpatched model equal torchvision's
    metadata at the first weights' crop size, else what differs.

    The model is built as the builder builds it for those weights (ViT: their image size;
    GoogLeNet: without the auxiliary heads it drops), without initialising weights, and counted
    on the meta device, so even regnet_y_128gf at 384 px costs no arithmetic.
    """
    import torchvision

    weights = next(iter(torchvision.models.get_model_weights(name)))
    crop = weights.transforms().crop_size[0]
    kwargs: dict[str, Any] = {"weights": None}
    if name.startswith("vit_"):
        kwargs["image_size"] = weights.meta["min_size"][0]
    if name == "googlenet":
        kwargs["aux_logits"] = False
    with warnings.catch_warnings(), _no_init():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, **kwargs).eval().to("meta")
    params = count_params(model)
    macs, _ = count_macs(model, (torch.empty(1, 3, crop, crop, device="meta"),))
    want_p, want_ops = weights.meta["num_params"], weights.meta["_ops"]
    problems = []
    if params != want_p:
        problems.append(f"params {params} != {want_p}")
    if round(macs / 1e9, 3) != round(want_ops, 3):
        problems.append(f"GMACs {macs / 1e9:.3f} != {want_ops} at {crop}px")
    return "; ".join(problems)


def run_model(name: str, task: str, placements: Sequence[str] = PLACEMENTS) -> list[Row]:
    """Check one builder for every placement (one build, shared by the placements)."""
    spec = spec_for(name, task)
    inputs = _describe(spec.eval_args())
    if spec.note:
        inputs += f" ({spec.note})"
    meta = ""
    if task == "classification":
        try:
            problem = check_classifier_meta(name)
            meta = "✗ " + problem if problem else "✓"
        except Exception as exc:  # noqa: BLE001 - reported in the table
            meta = f"✗ {type(exc).__name__}: {str(exc)[:80]}"
    try:
        original = build(spec).eval()
        eval_args, train_args = spec.eval_args(), spec.train_args()
        ref_eval = _run(original, eval_args, train=False)
        saved = _buffers(original)
        ref_train = _run(original, train_args, train=True)
        _restore(original, saved)
        original.eval()
        macs_before, _ = count_macs(original, eval_args)
        state_before = original.state_dict()
    except Exception as exc:  # noqa: BLE001
        reason = f"the original does not run: {type(exc).__name__}: {str(exc)[:160]}"
        return [Row(name, task, p, inputs, reason=reason, meta=meta) for p in placements]
    rows = []
    for placement in placements:
        row = Row(name, task, placement, inputs, meta=meta)
        start = time.process_time()
        try:
            _check_placement(row, spec, original, state_before, eval_args, train_args, ref_eval, ref_train, macs_before)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a row
            row.passed = False
            step = row.checks[-1] if row.checks else "patch"
            row.reason = f"{step}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            if "--debug" in sys.argv:
                traceback.print_exc()
        if meta.startswith("✗"):
            row.passed = False
            row.reason = f"torchvision metadata: {meta[2:]}" + (f"; {row.reason}" if row.reason else "")
        row.cpu_s = round(time.process_time() - start, 2)
        rows.append(row)
    return rows


def _check_placement(
    row: Row,
    spec: Spec,
    original: nn.Module,
    state_before: dict[str, torch.Tensor],
    eval_args: tuple[Any, ...],
    train_args: tuple[Any, ...],
    ref_eval: Any,
    ref_train: Any,
    macs_before: int,
) -> None:
    placement = row.placement
    row.checks.append("patch")
    try:
        patched = insert_cbam(original, after=placement, example_inputs=eval_args, init="identity", seed=0)
    except CBAMInsertError as exc:
        if "no site" not in str(exc):
            raise
        _check_no_site(row, original, eval_args, str(exc))
        return
    report = patched.cbam_report
    row.found, row.used = len(report.sites), len(report.used)
    row.skipped = row.found - row.used
    expected = _no_site_expectation(row.model, placement)
    if expected is not None:
        raise AssertionError(f"expected no site ({expected[1]}) but found {row.used}")

    row.checks.append("state-dict keys")
    after = patched.state_dict()
    for k, v in state_before.items():
        if k not in after:
            raise AssertionError(f"original key {k} is gone")
        if not torch.equal(after[k], v):
            raise AssertionError(f"original tensor {k} changed")
    extra = [k for k in after if k not in state_before and "cbam" not in k]
    if extra:
        raise AssertionError(f"new keys that are not CBAM's: {extra[:3]}")

    row.checks.append("identity eval")
    problem = compare(ref_eval, _run(patched, eval_args, train=False))
    if problem:
        raise AssertionError(problem)

    row.checks.append("identity train")
    saved = _buffers(patched)
    patched.train()
    torch.manual_seed(0)
    with torch.set_grad_enabled(spec.backward):
        out_train = patched(*train_args)
    problem = compare(ref_train, out_train)
    if problem:
        raise AssertionError(problem)
    if spec.backward:
        row.checks.append("backward")
        _backward(out_train)
    patched.zero_grad(set_to_none=True)
    _restore(patched, saved)

    row.checks.append("report")
    row.params_delta = count_params(patched) - count_params(original)
    macs_after, _ = count_macs(patched, eval_args)
    row.flops_delta = macs_after - macs_before

    row.checks.append("gates on")
    gates_on(patched)
    out_on = _run(patched, eval_args, train=False)
    problem = compare(ref_eval, out_on, values=False) if spec.task != "detection" else None
    if problem:
        raise AssertionError(problem)

    with tempfile.TemporaryDirectory(prefix="cbam-zoo-") as tmp:
        row.checks.append("pt round trip")
        loaded = _pt_roundtrip(patched, Path(tmp))
        problem = compare(out_on, _run(loaded, eval_args, train=False), tol=1e-6)
        if problem:
            raise AssertionError(problem)
        del loaded
        row.checks.append("state dict + recipe round trip")
        rebuilt = _state_dict_roundtrip(patched, spec, Path(tmp))
        problem = compare(out_on, _run(rebuilt, eval_args, train=False), tol=1e-6)
        if problem:
            raise AssertionError(problem)
        del rebuilt
    row.passed = True
    skipped = _skip_summary(report.sites)
    row.reason = f"{row.used} sites" + (f"; skipped {skipped}" if skipped else "")


def _check_no_site(row: Row, original: nn.Module, eval_args: tuple[Any, ...], message: str) -> None:
    sites = find_sites(original, after=row.placement, example_inputs=eval_args)
    row.found, row.used, row.skipped = len(sites), 0, len(sites)
    expected = _no_site_expectation(row.model, row.placement)
    summary = _skip_summary(sites) or "no candidate"
    if expected is None:
        raise AssertionError(f"no site, and none expected for this family ({summary})")
    rx, why = expected
    wrong = [s.reason for s in sites if not re.search(rx, s.reason)]
    if wrong:
        raise AssertionError(f"no site, but for the wrong reason: {wrong[0]} (expected: {why})")
    row.passed = True
    row.reason = f"no site: {why}" + (f" ({summary})" if sites else "")


# ----------------------------------------------------------------------------- the table


def render_markdown(rows: Sequence[Row], command: str) -> str:
    """The generated docs/zoo.md."""
    import torchvision

    models = list(dict.fromkeys(r.model for r in rows))
    with_sites = [r for r in rows if r.used]
    lines = [
        "<!-- generated by `" + command + "`; never edit by hand -->",
        "# Model zoo conformance",
        "",
        (
            f"Generated by `{command}` with torch {torch.__version__} and torchvision {torchvision.__version__}. "
            "Do not edit: rerun the command."
        ),
        "",
        (
            f"**{len(models)} builders × {len({r.placement for r in rows})} placements = {len(rows)} rows; "
            f"{sum(r.passed for r in rows)} pass, {sum(not r.passed for r in rows)} fail.** "
            f"{len(with_sites)} rows find sites ({sum(r.passed for r in with_sites)} pass); "
            f"{len(rows) - len(with_sites)} find none."
        ),
        "",
        (
            'Each row: the model is patched with `init="identity"` on the input shown (random weights); it must run in eval '
            "and train mode (forward and backward) with the original's output structure and shapes, reproduce the original's "
            f"outputs (eval, and train with the same seed) to {TOLERANCE:g} relative to their scale, keep every original "
            "state-dict key with an equal tensor, and, with the CBAM gates switched on, give the same outputs after a `pt` "
            "save/load and after a state dict + recipe reload into a fresh build. *tv meta*: for classifiers, the report's "
            'parameters and MACs of the unpatched model equal torchvision\'s `meta["num_params"]` and `meta["_ops"]` at '
            "the weights' crop size. Rows without a site pass only when that is expected for the family, for the reason "
            "given. Δparams and ΔMACs are what CBAM adds (MACs at the input shown; convolutions and matrix products only)."
        ),
        "",
        "| model | task | placement | input | found | used | skipped | Δparams | ΔMACs | tv meta | result | reason |",
        "|---|---|---|---|---:|---:|---:|---:|---:|:---:|:---:|---|",
    ]
    for r in rows:
        meta = "" if not r.meta else ("✓" if r.meta == "✓" else "✗")
        cells = [
            f"`{r.model}`", r.task, r.placement, r.inputs, str(r.found), str(r.used), str(r.skipped),
            f"{r.params_delta:,}" if r.used else "", f"{r.flops_delta:,}" if r.used else "", meta,
            "pass" if r.passed else "**FAIL**", r.reason.replace("|", "\\|"),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def _select(patterns: Sequence[str] | None, chunk: tuple[int, int] | None) -> list[tuple[str, str]]:
    todo = builders()
    if patterns:
        todo = [(n, t) for n, t in todo if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        if not todo:
            raise SystemExit(f"no torchvision builder matches {', '.join(patterns)}")
    if chunk is not None:
        i, n = chunk
        todo = todo[i - 1 :: n]
    return todo


def _parse_chunk(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise argparse.ArgumentTypeError(f"--chunk {text!r}: expected i/n with 1 <= i <= n, e.g. 1/4")
    return int(m.group(1)), int(m.group(2))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated names or globs, e.g. 'resnet*,vit_b_16' (default: all)")
    parser.add_argument("--placements", default=",".join(PLACEMENTS), help="comma-separated, default conv,block,stage")
    parser.add_argument("--chunk", type=_parse_chunk, help="run the i-th of n interleaved parts of the list, e.g. 2/4")
    parser.add_argument("--output", default="docs/zoo.md", help="markdown table path, '-' for stdout, '' for none")
    parser.add_argument("--json", help="also write the rows as JSON to this path")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="render the table from saved --json parts instead")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of failures")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.merge:
        merged = {(r["model"], r["placement"]): r for p in args.merge for r in json.loads(Path(p).read_text())}
        rows = [Row(**r) for r in merged.values()]  # a later part's row replaces an earlier one
        rows += [
            Row(n, t, p, "", reason="not run: the parts merged here stop before this builder")
            for n, t in builders()
            for p in PLACEMENTS
            if (n, p) not in merged
        ]
        order = {n: i for i, (n, _) in enumerate(builders())}
        rows.sort(key=lambda r: (order.get(r.model, len(order)), PLACEMENTS.index(r.placement)))
    else:
        placements = [p.strip() for p in args.placements.split(",") if p.strip()]
        bad = [p for p in placements if p not in PLACEMENTS]
        if bad:
            parser.error(f"unknown placement(s) {', '.join(bad)}; choose from {', '.join(PLACEMENTS)}")
        patterns = [p.strip() for p in args.models.split(",")] if args.models else None
        rows = []
        for name, task in _select(patterns, args.chunk):
            start, cpu = time.perf_counter(), time.process_time()
            got = run_model(name, task, placements)
            rows.extend(got)
            status = " ".join(f"{r.placement}:{'ok' if r.passed else 'FAIL'}" for r in got)
            print(
                f"{name:40s} {time.perf_counter() - start:7.1f}s wall {time.process_time() - cpu:7.1f}s cpu  {status}",
                file=sys.stderr,
                flush=True,
            )
            for r in got:
                if not r.passed:
                    print(f"    {r.placement}: {r.reason}", file=sys.stderr, flush=True)
            if args.json:  # after every model, so an interrupted run keeps what it did
                Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    text = render_markdown(rows, COMMAND)
    if args.output == "-":
        print(text)
    elif args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    failed = sum(not r.passed for r in rows)
    print(f"{len(rows)} rows, {len(rows) - failed} pass, {failed} fail", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
