"""The attributes a patched model carries (``cbam_recipe``, ``cbam_report``, its unpatched
structure), kept through ``copy.deepcopy`` of a fully traced model.

``fx.GraphModule.__deepcopy__`` rebuilds the copy from its graph and keeps only the submodules,
parameters and buffers the graph uses, so plain attributes vanish: a deep copy (an EMA model, a
``copy.deepcopy`` before export) could then no longer be saved as a patched model, turned into an
adapter or have CBAM removed. ``keep_through_deepcopy`` registers a deepcopy hook that puts the
deep-copied attributes back.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

__all__ = ["CARRIED", "keep_through_deepcopy"]

CARRIED = ("cbam_recipe", "cbam_report", "_cbam_base")


class _Carry:
    """A ``GraphModule`` deepcopy hook. It refers to its module's ``__dict__``: deep-copied with the
    module, the hook's copy refers to the deep copy of that dict, which holds the attributes."""

    def __init__(self, attrs: dict[str, Any]) -> None:
        self.attrs = attrs

    def __call__(self, copied: fx.GraphModule) -> None:
        for hook in copied._deepcopy_hooks:
            if isinstance(hook, _Carry):
                copied.__dict__.update({k: hook.attrs[k] for k in CARRIED if k in hook.attrs})
                hook.attrs = copied.__dict__


def keep_through_deepcopy(model: nn.Module) -> None:
    """Make ``copy.deepcopy(model)`` keep ``CARRIED`` (a no-op for modules that keep them anyway)."""
    if isinstance(model, fx.GraphModule) and not any(isinstance(h, _Carry) for h in model._deepcopy_hooks):
        model._register_deepcopy_hook(_Carry(model.__dict__))
