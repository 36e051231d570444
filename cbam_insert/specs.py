"""Architecture specs: ``torchvision:NAME`` and ``timm:NAME`` build a model with random weights."""

from __future__ import annotations

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
            close = [n for n in names if name.lower() in n][:5]
            hint = f"; did you mean {', '.join(close)}" if close else "; see torchvision.models.list_models()"
            raise CBAMInsertError(f"unknown torchvision model {name!r}{hint}")
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
        if name not in timm.list_models():
            raise CBAMInsertError(f"unknown timm model {name!r}")
        return timm.create_model(name, pretrained=False)
    raise CBAMInsertError(f"unknown model library {lib!r} in {spec!r}; use torchvision:NAME or timm:NAME")

