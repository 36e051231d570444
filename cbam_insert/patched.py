"""The tool's ``.pt`` file: a patched model that plain ``torch.load`` returns as the model.

A patched model is saved as one object whose pickle reads ``rebuild(payload)``, where
``payload`` is data only::

    {"cbam_insert": {"format": "pt", "version": 2, "training": bool},
     "base": <the unpatched structure, parameters on the meta device>,
     "recipe": <the recipe, JSON text>,
     "state_dict": <every weight of the patched model>}

* ``torch.load(path, weights_only=False)`` (with cbam-insert installed) calls ``rebuild``, which
  checks the payload, replays the recipe on the base structure and loads the weights: the result is
  the patched ``nn.Module``. No generated code is pickled; the only function the file names is
  ``ENTRY_POINT``.
* ``load_model(path)`` reads the same file without running anything the file chooses: its safe
  unpickler admits ``ENTRY_POINT`` and nothing else callable, and resolves it to ``payload_only``,
  which returns the payload untouched; the loader then validates and rebuilds it itself.

Files written before this layout (the payload dict at the top level, version 1) still load with
``load_model``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .errors import CBAMInsertError

__all__ = ["ENTRY_POINT", "payload_only", "rebuild", "wrap"]

ENTRY_POINT = f"{__name__}.rebuild"
"""The one global a patched ``.pt`` file names; stable across versions (it is part of the file format)."""

_KEYS = frozenset({"cbam_insert", "base", "recipe", "state_dict"})


class _Saved:
    """What ``torch.save`` pickles for a patched model: ``rebuild(payload)``."""

    def __init__(self, payload: dict[str, Any]) -> None:
        self.payload = payload

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        return rebuild, (self.payload,)


def wrap(payload: dict[str, Any]) -> _Saved:
    """The object to ``torch.save`` so that loading it calls ``rebuild(payload)``."""
    return _Saved(payload)


def _check_shape(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict) or set(payload) != _KEYS or not isinstance(payload["cbam_insert"], dict):
        raise CBAMInsertError("a damaged cbam-insert file (its payload is not {cbam_insert, base, recipe, state_dict})")
    return payload


def payload_only(payload: Any) -> dict[str, Any]:
    """What the safe loader calls in place of ``rebuild``: checks the payload's layout and returns it.

    It builds nothing and calls nothing; ``load_model`` then validates the base, the recipe and the
    weights and rebuilds the model with its own code.
    """
    return _check_shape(payload)


def rebuild(payload: Any) -> nn.Module:
    """The patched model from a payload; called by the unpickler of plain ``torch.load``.

    The tensors are where ``torch.load``'s ``map_location`` put them; the model goes to their
    device when they all share one.
    """
    from .load import _rebuild  # the loader's own checks and replay (lazy: load imports this module)

    payload = _check_shape(payload)
    # the full unpickler runs whatever the file names, so a user attention class in the recipe is
    # built as trusted as the rest of the file
    model = _rebuild(payload, "torch.load", trust=True)
    state = payload["state_dict"]
    devices = {v.device for v in state.values()} if isinstance(state, dict) else set()
    if len(devices) == 1:
        (device,) = devices
        if device.type != "cpu":
            model.to(device)
    return model
