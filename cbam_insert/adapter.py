"""Shipping only what the patch added, and taking it out again.

* ``save_adapter(model, path)`` (``save_model(..., format="adapter")``): a ``.safetensors`` file with
  the CBAM modules' weights and the recipe, nothing of the base model. ResNet-18 with CBAM on its 8
  residual branches: 0.36 MB of 47 MB.
* ``load_adapter(path, arch)`` (``load_model(adapter, arch=...)``): replays the recipe on ``arch`` -- a
  ``torchvision:NAME`` / ``timm:NAME`` spec or a model you built, e.g. with pretrained weights from
  elsewhere -- and loads the CBAM weights. The base keeps its own weights; a given module is
  copied, not changed.
* ``remove_cbam(model)``: the original architecture (its classes, no ``GraphModule`` left), the
  original state-dict keys and the original outputs, with the weights the patched model has now.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CBAMInsertError

__all__ = ["ADAPTER_KEY", "cbam_keys", "is_adapter", "load_adapter", "remove_cbam", "save_adapter"]

ADAPTER_KEY = "cbam_insert_adapter"
"""safetensors metadata key that marks an adapter file (value: its layout version)."""
_RECIPE_KEY = "cbam_insert_recipe"
_VERSION = "1"


def _recipe_modules(recipe: dict[str, Any]) -> list[str]:
    return [name for step in recipe.get("steps", []) for name in step.get("modules", [])]


def cbam_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of the CBAM modules a patched model's recipe names."""
    recipe = getattr(model, "cbam_recipe", None)
    if not isinstance(recipe, dict):
        raise CBAMInsertError(f"{type(model).__name__} was not patched by cbam-insert (it has no cbam_recipe)")
    prefixes = tuple(f"{name}." for name in _recipe_modules(recipe))
    return [k for k in model.state_dict() if k.startswith(prefixes)]


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write the CBAM weights and the recipe of ``model`` to ``path`` (atomically). Returns ``path``."""
    from .errors import require
    from .save import _atomic

    require("safetensors", "saving an adapter")
    from safetensors.torch import save_file

    path = Path(path)
    keys = cbam_keys(model)
    if not keys:
        raise CBAMInsertError(f"{type(model).__name__} has no CBAM weights to save")
    state = model.state_dict()
    tensors = {k: state[k].detach().to("cpu").contiguous() for k in keys}
    meta = {"format": "pt", ADAPTER_KEY: _VERSION, _RECIPE_KEY: json.dumps(model.cbam_recipe)}
    with _atomic(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return path


def is_adapter(path: Path) -> bool:
    """Whether a ``.safetensors`` file is an adapter (reads only its header)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return ADAPTER_KEY in (fh.metadata() or {})
    except Exception:  # noqa: BLE001 - not readable as safetensors: the caller's reader says why
        return False


def load_adapter(path: str | Path, arch: str | nn.Module | None) -> nn.Module:
    """The patched model: ``arch`` with the adapter's recipe replayed and its CBAM weights loaded."""
    from .load import _read_safetensors, _replay
    from .specs import build_arch

    path = Path(path)
    state, recipe = _read_safetensors(path)
    if arch is None:
        raise CBAMInsertError(
            f"{path}: an adapter holds only CBAM weights; give the base model it goes on with --arch "
            f"torchvision:NAME (API: load_model(path, arch=model_or_spec))"
        )
    if recipe is None:
        raise CBAMInsertError(f"{path}: an adapter without a recipe (a damaged file)")
    base = build_arch(arch) if isinstance(arch, str) else copy.deepcopy(arch)
    if getattr(base, "cbam_recipe", None) is not None:
        raise CBAMInsertError(f"{path}: the model given as arch already has CBAM; give the model without it")
    model = _replay(base, recipe, path)
    expected = set(cbam_keys(model))
    own = model.state_dict()
    unexpected = sorted(set(state) - expected)
    missing = sorted(expected - set(state))
    if unexpected or missing:
        what = f"{unexpected[0]} is not a CBAM weight of the recipe" if unexpected else f"{missing[0]} is missing"
        raise CBAMInsertError(f"{path}: not a complete adapter for this recipe ({what})")
    bad = [k for k in state if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise CBAMInsertError(
            f"{path}: the adapter does not fit this model: {k} has shape {tuple(state[k].shape)} in the file, "
            f"{tuple(own[k].shape)} in the model"
        )
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
    model.train(base.training)
    return model


def remove_cbam(model: nn.Module) -> nn.Module:
    """A copy of ``model`` without CBAM: the architecture it had before ``insert_cbam``.

    Every original module, class and state-dict key comes back, with the weights ``model`` holds now
    (trained or not); the result computes what the original architecture computes with them. Its
    training mode, devices and dtypes follow ``model``; ``model`` itself is not changed.
    """
    from .integrations import ultralytics

    if ultralytics.is_yolo_model(model) and ultralytics.cbam_modules(model):
        return ultralytics.unpatch_model(model)
    base = model.__dict__.get("_cbam_base")
    if base is None or not isinstance(getattr(model, "cbam_recipe", None), dict):
        raise CBAMInsertError(
            f"{type(model).__name__} was not patched by cbam-insert (no recipe or original structure to go back to)"
        )
    drop = set(cbam_keys(model))
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k not in drop}
    original = copy.deepcopy(base)
    want = set(original.state_dict())
    if want != set(state):
        extra = sorted(set(state) - want) or sorted(want - set(state))
        raise CBAMInsertError(
            f"cannot take CBAM out of {type(model).__name__}: its weights no longer match the original structure "
            f"({extra[0]} differs)"
        )
    original.load_state_dict(state, strict=True, assign=True)
    devices = {v.device for v in state.values()}
    if len(devices) == 1:
        original.to(next(iter(devices)))  # the non-persistent buffers too
    original.train(model.training)
    return original
