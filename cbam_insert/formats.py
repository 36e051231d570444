"""What files this tool reads and writes: format names, extensions, the layout of its own files.

``save_model`` writes one of ``FORMATS``; ``load_model`` reads what it wrote. A ``.pth`` state
dict's recipe lives beside it (``w.pth`` -> ``w.pth.recipe.json``); a ``.safetensors`` file
keeps it in its metadata under ``RECIPE_KEY``; the tool's ``.pt`` file holds the unpatched
structure, the recipe and the weights (layout version ``PT_VERSION``).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["EXTENSIONS", "FORMATS", "PT_VERSION", "RECIPE_KEY", "RECIPE_SUFFIX", "default_output", "is_spec"]

FORMATS = ("pt", "state-dict", "safetensors", "adapter", "torchscript", "onnx", "pt2")
EXTENSIONS = {
    ".pt": "pt",
    ".pth": "state-dict",
    ".safetensors": "safetensors",
    ".ts": "torchscript",
    ".torchscript": "torchscript",
    ".onnx": "onnx",
    ".pt2": "pt2",
}
FORMAT_EXT = {"pt": ".pt", "state-dict": ".pth", "safetensors": ".safetensors", "adapter": ".adapter.safetensors", "torchscript": ".ts", "onnx": ".onnx", "pt2": ".pt2"}
RECIPE_SUFFIX = ".recipe.json"
"""A ``.pth`` state dict's recipe lives beside it: ``w.pth`` -> ``w.pth.recipe.json``."""
RECIPE_KEY = "cbam_insert_recipe"
PT_VERSION = 2
"""1: the payload dict itself; 2: ``rebuild(payload)``, which plain ``torch.load`` runs (``cbam_insert.patched``)."""
ONNX_OPSET = 18
TRUST_HINT = "if you trust the file, pass --trust (API: load_model(..., trust=True))"
ARCH_HINT = "--arch torchvision:NAME (API: load_model(path, arch='torchvision:NAME'))"
SPEC_PREFIXES = ("torchvision:", "timm:")


def is_spec(text: str) -> bool:
    """Whether ``text`` names an architecture (``torchvision:NAME``, ``timm:NAME``) rather than a file."""
    return text.startswith(SPEC_PREFIXES)


def default_output(source: str | Path, fmt: str = "pt") -> Path:
    """Where the patched model goes when no output is given: beside the input, never over it."""
    ext = FORMAT_EXT.get(fmt, f".{fmt}")
    text = str(source)
    if is_spec(text):
        return Path(f"{text.split(':', 1)[1]}_cbam{ext}")
    path = Path(source)
    return path.with_name(f"{path.stem}_cbam{ext}")
