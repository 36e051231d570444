"""CBAM in an Ultralytics YOLO model that keeps working with Ultralytics' own tools.

    from ultralytics import YOLO
    from cbam_insert.integrations.ultralytics import patch_yolo

    yolo = patch_yolo(YOLO("yolov8n.pt"), after="block", reduction=8)
    yolo.train(data="data.yaml", epochs=1, imgsz=64)   # trains with CBAM; best.pt/last.pt keep it
    yolo.predict(images)                              # fused, with CBAM
    yolo.export(format="onnx")                        # with CBAM
    YOLO("runs/detect/train/weights/best.pt")         # loads back with CBAM (cbam-insert installed)

How: Ultralytics runs its layers from a list, replaces ``forward`` when it fuses convolutions, deep
copies the model for its EMA and pickles whole models into its checkpoints, so the model's objects
must stay what they are. ``patch_yolo`` therefore replaces nothing: each CBAM becomes a child
``cbam`` of the module whose output it refines, applied by a forward hook (``CBAMHook``, itself a
small ``nn.Module``, so the checkpoint unpickles with cbam-insert's safe loader too). Hooks survive
``fuse()``, ``deepcopy``, pickling, ``half()``, ``torch.jit.trace`` and the ONNX exporter. The new
state-dict keys end in ``.cbam.*``; every original key is unchanged.

Ultralytics' trainer rebuilds the model from its YAML before training, which would drop CBAM; a
patched ``YOLO`` object's ``train`` passes a trainer whose ``get_model`` puts the same CBAM modules
(and their current weights) back into the rebuilt model. A ``YOLO`` loaded from a CBAM checkpoint
predicts, validates and exports as it is; call ``patch_yolo(yolo)`` on it again before ``train``.
Under multi-GPU DDP Ultralytics starts its trainer in a new process from a generated file, where
this does not apply.

Placements (``after``): ``"block"``: the residual branch of every Bottleneck with a shortcut,
before the add (the output of its ``cv2``), the paper's placement; ``"conv"``: after every ``Conv``
unit (conv + BN + activation); or a module name, glob, ``re:`` regex or class name. The detection,
segmentation, pose or classification head (the last layer) is never patched.
"""

from __future__ import annotations

import copy
import fnmatch
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import CBAMInsertError
from ..modules import CBAM

__all__ = [
    "PLACEMENTS",
    "CBAMHook",
    "cbam_modules",
    "from_checkpoint",
    "is_yolo_checkpoint",
    "is_yolo_model",
    "patch_model",
    "patch_yolo",
    "unpatch_model",
    "write_checkpoint",
]

PLACEMENTS = ("block", "conv")
RECORD = "cbam_yolo"
"""The attribute of a patched Ultralytics model that records the patch (plain data, pickled with it)."""
_FORMAT = "cbam-insert/ultralytics"


class CBAMHook(nn.Module):
    """A forward hook: the module's output refined by the module's ``cbam`` child.

    An ``nn.Module`` with no parameters (and never a child of the model), so that a pickled model
    that holds it loads wherever ``nn.Module`` classes load.
    """

    def forward(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return module.cbam(output)


def _ultralytics() -> Any:
    try:
        import ultralytics.nn.modules as um
    except ImportError as exc:
        raise CBAMInsertError("the Ultralytics integration needs ultralytics: pip install ultralytics") from exc
    return um


def _layers(model: nn.Module) -> nn.Sequential:
    layers = getattr(model, "model", None)
    if not isinstance(layers, nn.Sequential) or not hasattr(model, "yaml"):
        raise CBAMInsertError(
            f"{type(model).__name__} is not an Ultralytics model (DetectionModel, SegmentationModel, ClassificationModel…)"
        )
    return layers


def _matcher(pattern: str) -> Callable[[str, nn.Module], bool]:
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return lambda name, m: rx.fullmatch(name) is not None
    return lambda name, m: fnmatch.fnmatchcase(name, pattern) or type(m).__name__ == pattern


def _targets(model: nn.Module, after: str) -> list[str]:
    """Qualified names of the modules whose outputs get CBAM, in model order, the head left out."""
    um = _ultralytics()
    layers = _layers(model)
    head = f"model.{len(layers) - 1}"
    found: list[str] = []
    for name, m in model.named_modules():
        if not name or name == head or name.startswith(head + ".") or isinstance(m, (CBAM, CBAMHook)):
            continue
        if after == "block":
            if isinstance(m, um.Bottleneck) and getattr(m, "add", False):
                found.append(f"{name}.cv2")
        elif after == "conv":
            if isinstance(m, um.Conv) and not name.endswith(".cbam"):
                found.append(name)
        elif _matcher(after)(name.removeprefix("model."), m) or _matcher(after)(name, m):
            found.append(name)
    return found


def _input_channels(model: nn.Module) -> int:
    cfg = getattr(model, "yaml", {}) or {}
    return int(cfg.get("channels", cfg.get("ch", 3)))


def _probe(model: nn.Module, names: list[str], imgsz: int) -> dict[str, tuple[int, ...]]:
    """The output shape of each named module on one dummy image (4-D tensors only)."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name in names:

        def record(mod: nn.Module, args: Any, out: Any, name: str = name) -> None:
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                shapes.setdefault(name, tuple(out.shape))

        handles.append(model.get_submodule(name).register_forward_hook(record))
    param = next(model.parameters())
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, _input_channels(model), imgsz, imgsz, device=param.device, dtype=param.dtype))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return shapes


def _attach(target: nn.Module, channels: int, options: dict[str, Any]) -> CBAM:
    ref = next(target.parameters(), None)
    cbam = CBAM(channels, dims=2, **options)
    if ref is not None:
        cbam.to(device=ref.device, dtype=ref.dtype)
    target.add_module("cbam", cbam)
    target.register_forward_hook(CBAMHook())
    return cbam


def _has_cbam(target: nn.Module) -> bool:
    return isinstance(getattr(target, "cbam", None), CBAM)


def patch_model(
    model: nn.Module, after: str = "block", *, imgsz: int = 64, seed: int | None = None, **cbam_options: Any
) -> list[str]:
    """Put CBAM into an Ultralytics model (``yolo.model``) in place; the names of the modules added.

    Sites that already have CBAM are skipped; a model with CBAM at every site is left as it is.
    ``imgsz`` is the size of the dummy image that measures channel counts.
    """
    from ..api import CBAM_OPTIONS

    if not isinstance(after, str) or not after.strip():
        raise CBAMInsertError(
            f"after must be one of {', '.join(PLACEMENTS)} or a module name / glob / class, got {after!r}"
        )
    unknown = sorted(set(cbam_options) - set(CBAM_OPTIONS))
    if unknown:
        raise CBAMInsertError(f"unknown CBAM option(s) {', '.join(unknown)}; valid: {', '.join(CBAM_OPTIONS)}")
    targets = _targets(model, after)
    if not targets:
        raise CBAMInsertError(
            f"no site for after={after!r} in {type(model).__name__}; placements: {', '.join(PLACEMENTS)}"
        )
    fresh = [t for t in targets if not _has_cbam(model.get_submodule(t))]
    record = getattr(model, RECORD, None)
    if not fresh:
        return []
    shapes = _probe(model, fresh, imgsz)
    fresh = [t for t in fresh if t in shapes]
    if not fresh:
        raise CBAMInsertError(f"after={after!r}: none of the matching modules outputs an (N, C, H, W) feature map")
    rng = torch.random.fork_rng(devices=[])
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        try:
            for name in fresh:
                _attach(model.get_submodule(name), shapes[name][1], cbam_options)
        except (TypeError, ValueError) as exc:
            raise CBAMInsertError(str(exc)) from exc
    sites = [{"module": name, "channels": shapes[name][1], "cbam": dict(cbam_options)} for name in fresh]
    if not isinstance(record, dict) or record.get("format") != _FORMAT:
        record = {"format": _FORMAT, "version": 1, "sites": []}
    record["sites"] = record["sites"] + sites
    setattr(model, RECORD, record)
    return [f"{name}.cbam" for name in fresh]


def cbam_modules(model: nn.Module) -> list[str]:
    """Qualified names of the CBAM modules in an Ultralytics model."""
    return [name for name, m in model.named_modules() if isinstance(m, CBAM)]


def _replay(model: nn.Module, record: dict[str, Any], source: nn.Module) -> None:
    """The same CBAM modules in a rebuilt ``model``, with ``source``'s CBAM weights."""
    for site in record["sites"]:
        try:
            target = model.get_submodule(site["module"])
        except AttributeError:
            raise CBAMInsertError(f"the rebuilt model has no module {site['module']} for its CBAM") from None
        if not _has_cbam(target):
            _attach(target, int(site["channels"]), site.get("cbam", {}))
    setattr(model, RECORD, copy.deepcopy(record))
    theirs = source.state_dict()
    ours = model.state_dict()
    cbam_state = {k: v for k, v in theirs.items() if ".cbam." in k and k in ours and v.shape == ours[k].shape}
    with torch.no_grad():
        for k, v in cbam_state.items():
            ours[k].copy_(v)


def unpatch_model(model: nn.Module) -> nn.Module:
    """A copy of a patched Ultralytics model without its CBAM modules and hooks: the original
    modules, state-dict keys and outputs."""
    out = copy.deepcopy(model)
    for mod in out.modules():
        for key, hook in list(mod._forward_hooks.items()):
            if isinstance(hook, CBAMHook):
                del mod._forward_hooks[key]
        if _has_cbam(mod):
            del mod._modules["cbam"]
    out.__dict__.pop(RECORD, None)
    return out


def _trainer_class(base: type, yolo: Any) -> type:
    """``base`` (the task's trainer) whose ``get_model`` keeps the CBAM modules of ``yolo.model``."""

    class CBAMTrainer(base):  # type: ignore[valid-type, misc]
        def get_model(self, *args: Any, **kwargs: Any) -> nn.Module:
            model = super().get_model(*args, **kwargs)
            source = yolo.model
            record = getattr(source, RECORD, None)
            if isinstance(record, dict) and record.get("sites"):
                _replay(model, record, source)
            return model

    CBAMTrainer.__name__ = CBAMTrainer.__qualname__ = f"CBAM{base.__name__}"
    return CBAMTrainer


def _install_train(yolo: Any) -> None:
    cls_train = type(yolo).train

    def train(trainer: Any = None, **kwargs: Any) -> Any:
        base = trainer or yolo._smart_load("trainer")
        return cls_train(yolo, trainer=_trainer_class(base, yolo), **kwargs)

    train.__doc__ = cls_train.__doc__
    object.__setattr__(yolo, "train", train)


def patch_yolo(
    yolo: Any, after: str = "block", *, imgsz: int = 64, seed: int | None = None, **cbam_options: Any
) -> Any:
    """Patch an ``ultralytics.YOLO`` in place (see the module docstring) and return it.

    ``cbam_options`` go to ``CBAM`` (``reduction``, ``kernel_size``, ``init="identity"`` for
    pretrained weights, …). On a YOLO whose model already has CBAM everywhere ``after`` points,
    nothing is added and ``train`` is set up to keep the existing CBAM.
    """
    model = getattr(yolo, "model", None)
    if not isinstance(model, nn.Module) or not hasattr(yolo, "_smart_load"):
        raise CBAMInsertError(f"patch_yolo expects an ultralytics.YOLO, got {type(yolo).__name__}")
    added = patch_model(model, after, imgsz=imgsz, seed=seed, **cbam_options)
    if not added and not cbam_modules(model):
        raise CBAMInsertError(f"no site for after={after!r} in {type(model).__name__}")
    _install_train(yolo)
    yolo.predictor = None  # a cached predictor wraps the model as it was
    return yolo


_CHECKPOINT = "_ultralytics_checkpoint"
"""Where a model read from an Ultralytics checkpoint keeps the checkpoint's other entries (not a submodule)."""


def is_yolo_model(model: Any) -> bool:
    """Whether ``model`` is an Ultralytics task model (checked without importing ultralytics)."""
    return (
        isinstance(model, nn.Module)
        and type(model).__module__.startswith("ultralytics.")
        and isinstance(getattr(model, "model", None), nn.Sequential)
        and hasattr(model, "yaml")
    )


def is_yolo_checkpoint(obj: Any) -> bool:
    """Whether ``obj`` is an Ultralytics checkpoint dict (``{"model" or "ema": <model>, ...}``)."""
    return isinstance(obj, dict) and is_yolo_model(obj.get("ema") or obj.get("model"))


def from_checkpoint(obj: dict[str, Any]) -> nn.Module:
    """The model of an Ultralytics checkpoint dict (its EMA when it has one), in float32; the other
    entries (training arguments, metrics, version) go with it for ``write_checkpoint``."""
    model = (obj.get("ema") or obj.get("model")).float()
    model.__dict__[_CHECKPOINT] = {k: v for k, v in obj.items() if k not in ("model", "ema", "optimizer", "scaler")}
    return model


def write_checkpoint(model: nn.Module, path: str) -> None:
    """``torch.save`` an Ultralytics checkpoint of ``model`` that ``YOLO(path)`` loads, keeping the
    entries of the checkpoint it was read from."""
    from datetime import datetime

    from .. import __version__

    extra = dict(model.__dict__.get(_CHECKPOINT, {}))
    saved = copy.deepcopy(model)
    saved.__dict__.pop(_CHECKPOINT, None)
    ckpt = {**extra, "date": datetime.now().astimezone().isoformat(), "model": saved.half(), "ema": None,
            "optimizer": None, "cbam_insert": __version__}  # fmt: skip
    torch.save(ckpt, path)
