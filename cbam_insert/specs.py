"""Architecture specs: ``torchvision:NAME`` and ``timm:NAME`` build a model with random weights."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from torch import nn

from .errors import CBAMInsertError

__all__ = ["build_arch"]


def build_arch(spec: str) -> nn.Module:
    """Build ``torchvision:NAME`` (or ``timm:NAME`` when timm is installed) with random weights."""
    lib, sep, name = spec.partition(":")
    if not sep or not name:
        raise CBAMInsertError(f"architecture spec {spec!r} must look like torchvision:NAME, e.g. torchvision:resnet50")
    if lib == "torchvision":
        import torchvision

        names = torchvision.models.list_models()
        if name not in names:
            raise CBAMInsertError(f"unknown torchvision model {name!r}{_suggest(name, names, 'torchvision.models')}")
        kwargs: dict = {"weights": None}
        if name in torchvision.models.list_models(torchvision.models.detection) or name in torchvision.models.list_models(
            torchvision.models.segmentation
        ):
            kwargs["weights_backbone"] = None
        return torchvision.models.get_model(name, **kwargs)
    if lib == "timm":
        try:
            import timm
        except ImportError as exc:
            raise CBAMInsertError("timm:NAME needs the timm package: pip install timm") from exc
        names = timm.list_models()
        if name not in names:
            raise CBAMInsertError(f"unknown timm model {name!r}{_suggest(name, names, 'timm')}")
        return timm.create_model(name, pretrained=False)
    raise CBAMInsertError(f"unknown model library {lib!r} in {spec!r}; use torchvision:NAME or timm:NAME")



def _suggest(name: str, names: Sequence[str], lib: str) -> str:
    """``"; did you mean resnet50, resnet101"``: the closest names (difflib), then names containing
    ``name``; else where to find the list."""
    close = difflib.get_close_matches(name.lower(), names, n=5, cutoff=0.75)
    close += [n for n in names if name.lower() in n and n not in close]
    if not close:
        return f"; see {lib}.list_models()"
    return f"; did you mean {', '.join(close[:5])}?"
