"""Loading and saving models (first version: built-in specs, pickled models, atomic writes).

``load_model(source)`` accepts ``torchvision:NAME`` (random weights) or a file written by
``torch.save(model)``. ``save_model(model, path)`` writes atomically: a temporary file in the
target directory, then a rename, so a failed save leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CBAMInsertError

__all__ = ["build_arch", "default_output", "load_model", "save_model"]


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


def load_model(source: str | Path, arch: str | None = None, trust: bool = False) -> nn.Module:
    """Load a model from a built-in spec or a file (see the module doc)."""
    text = str(source)
    if text.startswith(("torchvision:", "timm:")):
        return build_arch(text)
    path = Path(source)
    if not path.exists():
        raise CBAMInsertError(f"{path}: no such file")
    if path.is_dir():
        raise CBAMInsertError(f"{path}: is a directory, expected a model file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as exc:
        raise CBAMInsertError(f"{path}: cannot load ({type(exc).__name__}); pass --trust for a file you trust") from exc
    if not isinstance(obj, nn.Module):
        raise CBAMInsertError(f"{path}: holds a {type(obj).__name__}, not a model; use --arch torchvision:NAME --weights FILE")
    return obj


def default_output(source: str | Path, fmt: str = "pt") -> Path:
    """Where the patched model goes when no output is given: beside the input, never over it."""
    text = str(source)
    if text.startswith(("torchvision:", "timm:")):
        return Path(f"{text.split(':', 1)[1]}_cbam.{fmt}")
    path = Path(source)
    return path.with_name(f"{path.stem}_cbam.{fmt}")


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``; on any failure remove the temporary file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_model(model: nn.Module, path: str | Path, format: str | None = None) -> Path:
    """Save the whole model (``pt``) atomically."""
    path = Path(path)
    if not path.parent.exists():
        raise CBAMInsertError(f"{path.parent}: output directory does not exist")
    atomic_write(path, lambda tmp: torch.save(model, tmp))
    return path
