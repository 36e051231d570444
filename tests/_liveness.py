"""Checks shared by the ecosystem tests: is every CBAM of a patched model live in a mode?"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from cbam_insert.attention import is_attention

__all__ = ["first_tensor", "live_counts", "randomize_norms", "same_in_mode"]


def first_tensor(out: Any) -> torch.Tensor:
    """The first tensor of a model's output (a tensor, a tuple/list/dict of them, a ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for item in out:
            try:
                return first_tensor(item)
            except TypeError:
                continue
    raise TypeError(f"no tensor in {type(out).__name__}")


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm a random scale: zero-initialised last norms (timm, torchvision's
    zero_init_residual) would make a branch's CBAM see zeros and get a zero gradient."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) and getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
    return model


def live_counts(model: nn.Module, inputs: tuple[Any, ...], training: bool) -> dict[str, tuple[int, bool]]:
    """For each inserted attention module (CBAM or another): calls in one forward in the given mode, and whether backward from
    the output reached its parameters. Runs on a copy (train mode updates norm statistics)."""
    work = copy.deepcopy(model)
    calls: dict[str, int] = {}
    for name, mod in work.named_modules():
        if is_attention(mod):
            calls[name] = 0
            mod.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls[name] + 1))
    work.train(training)
    for p in work.parameters():
        p.grad = None
    first_tensor(work(*inputs)).float().sum().backward()
    mods = dict(work.named_modules())
    return {
        name: (n, all(p.grad is not None for p in mods[name].parameters()) and any(True for _ in mods[name].parameters()))
        for name, n in calls.items()
    }


def same_in_mode(a: nn.Module, b: nn.Module, inputs: tuple[Any, ...], training: bool, seed: int = 0) -> float:
    """Largest difference between the outputs of ``a`` and ``b`` in one mode, on copies, with the
    same random draws (dropout, stochastic depth) for both."""
    outs = []
    for m in (a, b):
        work = copy.deepcopy(m).train(training)
        torch.manual_seed(seed)
        with torch.no_grad():
            outs.append(first_tensor(work(*inputs)).float())
    return float((outs[0] - outs[1]).abs().max())
