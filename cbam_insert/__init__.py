"""cbam-insert: put CBAM attention into an existing PyTorch model without editing its source."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cbam-insert")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

from .adapter import remove_cbam
from .api import PatchReport, apply_recipe, find_sites, insert_attention, insert_cbam
from .attention import ATTENTION
from .errors import CBAMInsertError
from .load import load_model
from .modules import CBAM, ChannelAttention, SpatialAttention
from .save import save_model
from .sites import Site

__all__ = [
    "ATTENTION",
    "CBAM",
    "CBAMInsertError",
    "ChannelAttention",
    "PatchReport",
    "Site",
    "SpatialAttention",
    "__version__",
    "apply_recipe",
    "find_sites",
    "insert_attention",
    "insert_cbam",
    "load_model",
    "remove_cbam",
    "save_model",
]
