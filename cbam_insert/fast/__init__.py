"""Speed machinery for CBAM's forward, kept apart from the maths in ``cbam_insert.modules``.

``cbam_insert.modules.CBAM`` calls one function, ``attend(cbam, x)``, which returns the
refined tensor computed on a faster path, or None where the plain formulation must run
(other orders or pool types, tracing, ``torch.compile``, export, TorchScript). The paths:

* training in eager mode: ``function.CBAMFunction``, a hand-written autograd function that keeps
  only the input and per-sample tensors for backward;
* inference: ``kernel.attend`` (the optional compiled CPU kernel, when enabled), else
  ``eager.attend_inference`` (one full-size tensor, cache-blocked reductions).

All compute the same values as the plain path (float rounding aside). This package imports
nothing from ``cbam_insert.modules``: it reads the module's documented attributes.
"""

from __future__ import annotations

from typing import Any

import torch

from . import kernel
from .eager import attend_inference, tracing
from .function import CBAMFunction

__all__ = ["attend"]


def fusable(cbam: Any) -> bool:
    """The paper's configuration: both gates, channel then spatial, avg+max channel pooling."""
    cg, sg = cbam.channel_gate, cbam.spatial_gate
    return (
        cg is not None
        and sg is not None
        and cbam.order == "channel_first"
        and sorted(cg.pool_types) == ["avg", "max"]
    )


def _autocast(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


def attend(cbam: Any, x: torch.Tensor) -> torch.Tensor | None:
    """``CBAM``'s attention on a fast path (before any identity gate), or None for the plain path."""
    if not cbam._fast or tracing() or type(x) is not torch.Tensor or _autocast(x.device.type):
        return None  # under autocast (AMP) the plain ops get autocast's per-op dtypes
    if torch.is_grad_enabled():
        params = [p for p in cbam.parameters() if p is not cbam.gamma]
        if x.requires_grad or any(p.requires_grad for p in params):
            return CBAMFunction.apply(x, cbam, *params)
    out = kernel.attend(cbam, x)
    if out is not None:
        return out
    return attend_inference(cbam, x)
