"""Parameter and FLOP accounting for a patch, and its Rich rendering.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the example input and
reported as multiply-accumulates (MACs), torchvision's convention for ``meta["_ops"]``: only
matrix multiplications and convolutions are counted (elementwise ops, pooling, sigmoid and the
attention multiplications are not).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .modules import CBAM

__all__ = ["CostReport", "cost_report", "count_macs", "count_params"]

FLOP_NOTE = "FLOPs are multiply-accumulates of convolutions and matrix products (torchvision's convention)"


def count_params(model: nn.Module) -> int:
    """Number of parameters, each shared tensor counted once."""
    seen = {}
    for p in model.parameters():
        seen[id(p)] = p.numel()
    return sum(seen.values())


def count_macs(model: nn.Module, example_inputs: tuple[Any, ...]) -> tuple[int, dict[str, int]]:
    """Total MACs of one eval-mode forward, and MACs per CBAM module (by qualified name)."""
    was_training = model.training
    model.eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA kernel is invisible to the counter
    try:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(*example_inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
    per_module = counter.get_flop_counts()
    cbam_names = [n for n, m in model.named_modules() if isinstance(m, CBAM)]
    per_site = {}
    for name in cbam_names:
        counts = _lookup(per_module, name)
        per_site[name] = sum(counts.values()) // 2 if counts else 0
    return counter.get_total_flops() // 2, per_site


def _lookup(per_module: dict[str, dict[Any, int]], name: str) -> dict[Any, int] | None:
    for key, counts in per_module.items():
        if key == name or key.endswith("." + name) or key.split(".", 1)[-1] == name:
            return counts
    return None


@dataclass
class CostReport:
    """Before/after parameters and MACs, in total and per inserted CBAM module."""

    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    per_module: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (params, macs)

    @property
    def params_delta(self) -> int:
        return self.params_after - self.params_before

    @property
    def flops_delta(self) -> int:
        return self.flops_after - self.flops_before

    def to_dict(self) -> dict[str, Any]:
        def pct(a: int, b: int) -> float:
            return round(100.0 * (b - a) / a, 4) if a else 0.0

        return {
            "params": {"before": self.params_before, "after": self.params_after, "delta": self.params_delta,
                       "percent": pct(self.params_before, self.params_after)},
            "flops": {"before": self.flops_before, "after": self.flops_after, "delta": self.flops_delta,
                      "percent": pct(self.flops_before, self.flops_after), "unit": "MACs", "counted": FLOP_NOTE},
        }  # fmt: skip


def cost_report(original: nn.Module, patched: nn.Module, example_inputs: tuple[Any, ...]) -> CostReport:
    """Count parameters and MACs of both models on the same example input."""
    before, _ = count_macs(original, example_inputs)
    after, per_site = count_macs(patched, example_inputs)
    modules = dict(patched.named_modules())
    per_module = {n: (count_params(modules[n]), macs) for n, macs in per_site.items()}
    return CostReport(count_params(original), count_params(patched), before, after, per_module)


def modules_added(patched: nn.Module) -> list[str]:
    return [n for n, m in patched.named_modules() if isinstance(m, CBAM)]
