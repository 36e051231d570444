"""Meta-device copies: a model's structure without its memory.

Used to record the unpatched architecture of a patched model (``api``: replayed when a saved
file is loaded) and to count FLOPs without allocating activations (``report``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["meta_copy", "to_meta"]


def meta_copy(model: nn.Module, keep_non_persistent: bool = False) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are empty meta tensors.

    ``keep_non_persistent``: buffers that are not in a state dict are copied as they are (a
    rebuilt model gets its persistent ones from the saved weights, but has no other source for
    the rest). The copy drops a ``_cbam_base`` the model may carry.
    """
    memo: dict[int, Any] = {}
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None:
                memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for name, b in mod._buffers.items():
            if b is not None and not (keep_non_persistent and name in mod._non_persistent_buffers_set):
                memo[id(b)] = torch.empty_like(b, device="meta")
    base = copy.deepcopy(model, memo)
    base.__dict__.pop("_cbam_base", None)
    return base


def to_meta(value: Any) -> Any:
    """Tensors (nested in lists, tuples and dicts) moved to the meta device."""
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    if isinstance(value, (list, tuple)):
        return type(value)(to_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: to_meta(v) for k, v in value.items()}
    return value
