"""Loading and saving models, safely.

``load_model(source, arch=None, trust=False)`` reads

* ``torchvision:NAME`` / ``timm:NAME``: the architecture with random weights;
* a file from ``torch.save(model)``, WITHOUT running code from the file: PyTorch's weights-only
  unpickler, allowing only the references that are data (see ``SafePickle``). Anything else is
  refused with the offending references listed; ``trust=True`` (CLI ``--trust``) loads a file the
  user trusts with the full unpickler;
* this tool's own ``pt`` file (a patched model): the unpatched structure is unpickled the same safe
  way, its recipe is replayed and the weights are loaded, so no generated code is ever unpickled;
* a state dict (``.pth`` through the weights-only unpickler, or ``.safetensors``) together with
  ``arch="torchvision:NAME"``. When the weights carry a recipe (safetensors metadata, or the JSON file
  ``NAME.pth.recipe.json`` beside a ``.pth``) the patched model is rebuilt by replaying it.

TorchScript archives, ``torch.export`` programs and ONNX files are refused with what to give instead
(they are compiled graphs, not modules that can be patched).

``save_model(model, path, format=None)`` writes one of ``FORMATS`` (inferred from the extension
where unambiguous) through a temporary file in the target directory and a rename, so a failed or
interrupted save leaves nothing behind.
"""

from __future__ import annotations

import _compat_pickle  # the Python 2 names protocol-2 pickles use (__builtin__, commands)
import contextlib
import functools
import importlib
import importlib.util
import json
import math
import os
import pickletools
import re
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from .errors import CBAMInsertError

__all__ = ["FORMATS", "RECIPE_SUFFIX", "SafePickle", "build_arch", "default_output", "load_model", "save_model"]

FORMATS = ("pt", "state-dict", "safetensors", "torchscript", "onnx", "pt2")
EXTENSIONS = {
    ".pt": "pt",
    ".pth": "state-dict",
    ".safetensors": "safetensors",
    ".ts": "torchscript",
    ".torchscript": "torchscript",
    ".onnx": "onnx",
    ".pt2": "pt2",
}
_FORMAT_EXT = {"pt": ".pt", "state-dict": ".pth", "safetensors": ".safetensors", "torchscript": ".ts", "onnx": ".onnx", "pt2": ".pt2"}
RECIPE_SUFFIX = ".recipe.json"
"""A ``.pth`` state dict's recipe lives beside it: ``w.pth`` -> ``w.pth.recipe.json``."""
_RECIPE_KEY = "cbam_insert_recipe"
_PT_VERSION = 1
_ONNX_OPSET = 18
_TRUST_HINT = "if you trust the file, pass --trust (API: load_model(..., trust=True))"
_ARCH_HINT = "--arch torchvision:NAME (API: load_model(path, arch='torchvision:NAME'))"

# ----------------------------------------------------------------------------- architectures


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


def _is_spec(text: str) -> bool:
    return text.startswith(("torchvision:", "timm:"))


def default_output(source: str | Path, fmt: str = "pt") -> Path:
    """Where the patched model goes when no output is given: beside the input, never over it."""
    ext = _FORMAT_EXT.get(fmt, f".{fmt}")
    text = str(source)
    if _is_spec(text):
        return Path(f"{text.split(':', 1)[1]}_cbam{ext}")
    path = Path(source)
    return path.with_name(f"{path.stem}_cbam{ext}")


# ----------------------------------------------------------------------------- safe unpickling


class SafePickle:
    """Decides which references of a ``torch.save`` pickle may load without trusting the file.

    PyTorch's weights-only unpickler already admits tensors, dtypes, ``torch.Size``,
    ``OrderedDict`` and ``set``. On top of that this policy allows, and only when the file uses
    them the way ``torch.save(model)`` does:

    * ``nn.Module`` subclasses, created only by ``NEWOBJ`` (``cls.__new__`` with no constructor
      call) and filled by ``BUILD`` (``__setstate__``): the pickle sets attributes, it never calls
      the class. A pickle that calls a module class (``REDUCE``) is refused. ``GraphModule`` and
      ``ScriptModule`` subclasses are refused: they carry code.
    * ``functools.partial`` whose function is such an allowed module class (torchvision's ViTs
      keep ``partial(nn.LayerNorm, eps=1e-6)``): a deferred constructor, no wider than the class.
    * ``TORCHVISION_HELPERS``: the few non-module objects torchvision's detection and optical-flow
      models keep, restored the same way and never called while loading: plain classes holding
      numbers (box coders, matchers, samplers) and two pure tensor functions.

    A class is resolved from a module already imported, or imported from an installed distribution
    (never the standard library, never a file in the current directory): importing a module named by
    the file runs only code the user installed. Everything else -- functions (``builtins.exec``,
    ``os.system``, ``subprocess.call``), other classes, unknown modules -- is refused.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.allowed: list[tuple[Any, str]] = []
        self.refused: list[str] = []

    def check(self) -> None:
        """Fill ``allowed`` and ``refused`` from the file; raise ``CBAMInsertError`` when it is unreadable."""
        data = _pickle_bytes(self.path)
        if data[:1] == b"\x80" and len(data) > 1 and data[1] > 3:
            raise CBAMInsertError(
                f"{self.path}: written with pickle protocol {data[1]}, which PyTorch's safe loader cannot read; "
                f"re-save it with torch.save's default protocol, or {_TRUST_HINT}"
            )
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(self.path)))
        scan = _scan(data)
        module_classes: dict[str, type] = {}
        helpers: dict[str, Any] = {}
        for full, (mod, name) in sorted(scan.globals.items()):
            if full not in unsafe and f"{mod}.{name}" not in unsafe:
                continue
            obj, why = _resolve(mod, name)
            if obj is not None and isinstance(obj, type) and issubclass(obj, nn.Module):
                module_classes[full] = obj
            elif obj is not None and full in TORCHVISION_HELPERS:
                helpers[full] = obj
            elif full != "functools.partial":
                self.refused.append(f"{mod}.{name} ({why or _kind(obj)})")
        for full in sorted(scan.called & (set(module_classes) | set(helpers))):
            self.refused.append(f"{full} (the file calls it instead of restoring an instance)")
            module_classes.pop(full, None)
            helpers.pop(full, None)
        if "functools.partial" in unsafe:
            bad = scan.partial_funcs - set(module_classes)
            if bad or scan.partial_unknown:
                what = ", ".join(sorted(bad)) if bad else "something that is not a named module class"
                self.refused.append(f"functools.partial (wrapping {what})")
            else:
                self.allowed.append((functools.partial, "functools.partial"))
        self.allowed.extend((obj, full) for full, obj in (module_classes | helpers).items())

    def load(self) -> Any:
        if self.refused:
            raise CBAMInsertError(
                f"{self.path}: refused to load: it references {'; '.join(self.refused)}; "
                f"loading it could run code from the file (only nn.Module classes and plain data load "
                f"without trust); {_TRUST_HINT}"
            )
        with torch.serialization.safe_globals(self.allowed):
            try:
                return torch.load(self.path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise CBAMInsertError(f"{self.path}: cannot be read safely ({_first_line(exc)}); {_TRUST_HINT}") from exc


def _kind(obj: Any) -> str:
    if isinstance(obj, type):
        return "a class that is not an nn.Module"
    if callable(obj):
        return "a function"
    return "not a class"


def _resolve(mod: str, name: str) -> tuple[Any, str]:
    """The object ``mod.name`` names, importing ``mod`` only from an installed distribution."""
    module = sys.modules.get(mod)
    if module is None:
        top = mod.partition(".")[0]
        if top in sys.stdlib_module_names:
            return None, "a standard-library module that defines no model"
        if top not in _installed_packages():
            return None, f"module {mod} is neither imported nor installed; import it first or trust the file"
        try:
            module = importlib.import_module(mod)
        except Exception as exc:  # noqa: BLE001 - whatever the import raises, the name does not resolve
            return None, f"cannot import {mod}: {_first_line(exc)}"
    obj: Any = module
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None, f"{mod} has no {name}"
    if isinstance(obj, type) and issubclass(obj, (fx.GraphModule, torch.jit.ScriptModule)):
        return None, "a module class that carries code"
    return obj, ""


@functools.lru_cache(maxsize=1)
def _installed_packages() -> frozenset[str]:
    from importlib.metadata import packages_distributions

    return frozenset(packages_distributions())


@dataclass
class _Scan:
    """What a pickle references (``GLOBAL``), which of those it calls (``REDUCE``), what partials wrap.

    ``globals`` maps each reference as written to its Python 3 ``(module, name)``.
    """

    globals: dict[str, tuple[str, str]] = field(default_factory=dict)
    called: set[str] = field(default_factory=set)
    partial_funcs: set[str] = field(default_factory=set)
    partial_unknown: bool = False


TORCHVISION_HELPERS = frozenset({
    "torchvision.models.detection._utils.BalancedPositiveNegativeSampler",
    "torchvision.models.detection._utils.BoxCoder",
    "torchvision.models.detection._utils.BoxLinearCoder",
    "torchvision.models.detection._utils.Matcher",
    "torchvision.models.detection._utils.SSDMatcher",
    "torchvision.ops.boxes.box_iou",
    "torchvision.ops.poolers.LevelMapper",  # five numbers (k_min, k_max, scale, level, eps), set on a first run
    "torchvision.models.optical_flow.raft._pass_through_h",
})  # fmt: skip

_PUSH_ONE = {
    "NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT",
    "BINFLOAT", "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
    "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "EMPTY_DICT", "EMPTY_LIST", "EMPTY_SET",
}  # fmt: skip


def _scan(data: bytes) -> _Scan:
    """Walk the opcodes with a symbolic stack: a ``GLOBAL`` stays a name until something consumes it.

    Only the opcodes ``torch.save`` writes (protocol 2) are followed; any other one makes the file
    unreadable here, as it is for the weights-only unpickler.
    """
    scan = _Scan()
    stack: list[Any] = []
    marks: list[list[Any]] = []
    memo: dict[Any, Any] = {}
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name == "GLOBAL":
                mod, _, attr = str(arg).partition(" ")
                full = f"{mod}.{attr}"
                scan.globals[full] = _compat_pickle.NAME_MAPPING.get((mod, attr), (_compat_pickle.IMPORT_MAPPING.get(mod, mod), attr))
                stack.append(("global", full))
            elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo[arg])
            elif name == "MARK":
                marks.append(stack)
                stack = []
            elif name == "TUPLE":
                items = stack
                stack = marks.pop()
                stack.append(("tuple", tuple(items)))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"):
                n = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3, "EMPTY_TUPLE": 0}[name]
                items = tuple(stack[len(stack) - n :])
                del stack[len(stack) - n :]
                stack.append(("tuple", items))
            elif name == "REDUCE":
                args = stack.pop()
                func = stack[-1]
                if func[0] == "global":
                    scan.called.add(func[1])
                    if func[1] == "functools.partial":
                        _partial_target(scan, args)
                stack[-1] = ("partial",) if func == ("global", "functools.partial") else ("value",)
            elif name == "NEWOBJ":
                stack.pop()
                stack[-1] = ("value",)
            elif name == "BUILD":
                state = stack.pop()
                if stack[-1] == ("partial",):
                    _partial_target(scan, state)
            elif name == "APPEND":
                stack.pop()
            elif name == "BINPERSID":
                stack[-1] = ("value",)
            elif name == "SETITEM":
                del stack[-2:]
            elif name in ("APPENDS", "SETITEMS"):
                stack = marks.pop()
            elif name in _PUSH_ONE:
                stack.append(("value",))
            elif name in ("PROTO", "STOP", "FRAME"):
                continue
            else:
                raise CBAMInsertError(f"uses the pickle opcode {name}, which the safe loader does not read")
    except (IndexError, KeyError, ValueError) as exc:
        raise CBAMInsertError(f"its pickle is corrupt or truncated ({_first_line(exc)})") from exc
    return scan


def _partial_target(scan: _Scan, args: Any) -> None:
    """Record the function a ``functools.partial`` wraps (first item of its args or state)."""
    if args[0] == "tuple" and args[1] and args[1][0][0] == "global":
        scan.partial_funcs.add(args[1][0][1])
    else:
        scan.partial_unknown = True


def _pickle_bytes(path: Path) -> bytes:
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(names) != 1:
            raise CBAMInsertError(f"{path}: a zip archive without a PyTorch pickle (data.pkl)")
        return zf.read(names[0])


# ----------------------------------------------------------------------------- loading


def load_model(source: str | Path, arch: str | nn.Module | None = None, trust: bool = False) -> nn.Module:
    """Load a model from a spec or a file (see the module docstring for what is accepted).

    ``arch`` (``"torchvision:NAME"``, ``"timm:NAME"`` or a freshly built module) is the
    architecture a state-dict file's weights go into. ``trust=True`` unpickles a ``torch.save``
    file with the full unpickler, which can run code from the file: only for files you trust.
    Raises ``CBAMInsertError`` with a one-line message for anything that cannot be loaded.
    """
    text = str(source)
    if _is_spec(text):
        if arch is not None:
            raise CBAMInsertError(f"{text} is already an architecture; --arch goes with a weights file")
        return build_arch(text)
    path = Path(source)
    if not path.exists():
        lib, sep, name = text.partition(":")
        if sep and len(lib) > 1 and lib.isidentifier() and name and not any(c in name for c in "/\\"):
            raise CBAMInsertError(f"{text}: no such file, and {lib!r} is not a model library; use torchvision:NAME or timm:NAME")
        raise CBAMInsertError(f"{path}: no such file")
    if path.is_dir():
        raise CBAMInsertError(f"{path}: is a directory, expected a model file")
    kind = _sniff(path)
    if kind == "safetensors":
        state, recipe = _read_safetensors(path)
        model = _weights_into(arch, state, recipe, path)
    else:
        model = _from_object(_unpickle(path, kind, trust), path, arch)
    return model


def _sniff(path: Path) -> str:
    """``zip`` (torch.save), ``legacy`` (old torch.save), ``safetensors``; other formats raise."""
    size = path.stat().st_size
    if size == 0:
        raise CBAMInsertError(f"{path}: is empty (0 bytes)")
    with open(path, "rb") as fh:
        head = fh.read(9)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile:
            raise CBAMInsertError(f"{path}: truncated or corrupt (a damaged zip archive)") from None
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            raise CBAMInsertError(
                f"{path}: a TorchScript archive, a compiled graph that cannot be patched; give the original "
                f"model (a torch.save file, or {_ARCH_HINT} with its weights)"
            )
        if any(n.endswith("/archive_format") or "/models/" in n for n in names):
            raise CBAMInsertError(
                f"{path}: a torch.export program (.pt2), which cannot be patched; give the original model "
                f"(a torch.save file, or {_ARCH_HINT} with its weights)"
            )
        return "zip"
    if path.suffix == ".safetensors" or (head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size):
        return "safetensors"
    if path.suffix == ".onnx" or head.startswith(b"\x08"):
        raise CBAMInsertError(
            f"{path}: an ONNX model, which cannot be patched; give the PyTorch model (a torch.save file, "
            f"or {_ARCH_HINT} with its weights)"
        )
    if head.startswith(b"\x80"):
        return "legacy"
    raise CBAMInsertError(
        f"{path}: not a model file this tool reads (expected a torch.save file, a state dict (.pth) or .safetensors)"
    )


def _unpickle(path: Path, kind: str, trust: bool) -> Any:
    if trust:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise CBAMInsertError(f"{path}: cannot be read ({type(exc).__name__}: {_first_line(exc)})") from exc
    if kind == "legacy":
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CBAMInsertError(
                f"{path}: an old-format (pre-zip) pickle that the safe loader cannot read ({_first_line(exc)}); "
                f"re-save it with a current torch, or {_TRUST_HINT}"
            ) from exc
    try:
        policy = SafePickle(path)
        policy.check()
    except CBAMInsertError as exc:
        raise CBAMInsertError(f"{path}: {exc}" if not str(exc).startswith(str(path)) else str(exc)) from None
    except Exception as exc:
        raise CBAMInsertError(f"{path}: truncated or corrupt ({_first_line(exc)})") from exc
    return policy.load()


def _from_object(obj: Any, path: Path, arch: str | nn.Module | None) -> nn.Module:
    if isinstance(obj, dict) and isinstance(obj.get("cbam_insert"), dict):
        if arch is not None:
            raise CBAMInsertError(f"{path}: holds a whole patched model; drop --arch")
        return _rebuild(obj, path)
    if isinstance(obj, nn.Module):
        if arch is not None:
            raise CBAMInsertError(f"{path}: holds a whole model; drop --arch")
        return obj
    state = _as_state_dict(obj)
    if state is not None:
        if arch is None:
            raise CBAMInsertError(
                f"{path}: holds only a state dict ({len(state)} tensors), no architecture; give it with {_ARCH_HINT}"
            )
        return _weights_into(arch, state, _sidecar_recipe(path), path)
    if isinstance(obj, torch.Tensor):
        raise CBAMInsertError(f"{path}: holds a single tensor of shape {tuple(obj.shape)}, not a model or a state dict")
    if isinstance(obj, dict):
        keys = ", ".join(repr(k) for k in list(obj)[:5])
        raise CBAMInsertError(
            f"{path}: holds a dict ({keys}{', …' if len(obj) > 5 else ''}) that is neither a model nor a state dict "
            f"(a state dict maps parameter names to tensors)"
        )
    raise CBAMInsertError(f"{path}: holds a {type(obj).__name__}, not a model or a state dict")


def _as_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """``obj`` itself, or a training checkpoint's ``state_dict`` / ``model_state_dict`` / ``model`` entry."""

    def is_state(d: Any) -> bool:
        return isinstance(d, dict) and bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())

    if is_state(obj):
        return obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if is_state(obj.get(key)):
                return obj[key]
    return None


def _sidecar_recipe(path: Path) -> dict[str, Any] | None:
    side = path.with_name(path.name + RECIPE_SUFFIX)
    if not side.is_file():
        return None
    try:
        return json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CBAMInsertError(f"{side}: not a readable recipe ({_first_line(exc)})") from exc


def _require(module: str, purpose: str) -> None:
    """Raise a one-line error naming the extra to install when an optional package is missing."""
    if importlib.util.find_spec(module) is None:
        raise CBAMInsertError(f"{purpose} needs the {module} package: pip install 'cbam-insert[export]'")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    _require("safetensors", "reading .safetensors")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is not a Mapping
    except Exception as exc:
        raise CBAMInsertError(f"{path}: truncated or corrupt safetensors file ({_first_line(exc)})") from exc
    for alias, kept in meta.items():  # tied weights that safetensors.torch.save_model stored once
        if alias not in state and kept in state:
            state[alias] = state[kept]
    recipe = None
    if _RECIPE_KEY in meta:
        try:
            recipe = json.loads(meta[_RECIPE_KEY])
        except ValueError as exc:
            raise CBAMInsertError(f"{path}: its recipe metadata is not valid JSON") from exc
    return state, recipe


def _weights_into(
    arch: str | nn.Module | None, state: dict[str, torch.Tensor], recipe: dict[str, Any] | None, path: Path
) -> nn.Module:
    if arch is None:
        raise CBAMInsertError(
            f"{path}: holds only weights ({len(state)} tensors), no architecture; give it with {_ARCH_HINT}"
        )
    model = build_arch(arch) if isinstance(arch, str) else arch
    if recipe is not None:
        model = _replay(model, recipe, path)
    _load_state(model, state, path, recipe is not None)
    return model


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path, has_recipe: bool) -> None:
    """``load_state_dict(strict=True)`` with the mismatch said in one line."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        hint = ""
        if not has_recipe and any("cbam" in k for k in unexpected):
            hint = (f"; the weights hold CBAM modules but no recipe was found (safetensors metadata, or "
                    f"{path.name}{RECIPE_SUFFIX} beside the file)")  # fmt: skip
        elif not has_recipe and all(k.startswith("module.") for k in unexpected):
            hint = "; the keys start with 'module.' (saved from DataParallel): strip that prefix"
        raise CBAMInsertError(
            f"{path}: the weights do not fit {type(model).__name__}: {', '.join(parts)}{hint}; build the same architecture"
        )
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise CBAMInsertError(
            f"{path}: the weights do not fit {type(model).__name__}: {k} has shape {tuple(state[k].shape)} "
            f"in the file, {tuple(own[k].shape)} in the model ({len(bad)} such tensors)"
        )
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtype=dtypes.pop())
    model.load_state_dict(state, strict=True)


def _rebuild(obj: dict[str, Any], path: Path) -> nn.Module:
    """A patched model from this tool's ``pt`` file: structure, recipe replayed, weights loaded."""
    info = obj["cbam_insert"]
    if info.get("format") != "pt" or not isinstance(info.get("version"), int):
        raise CBAMInsertError(f"{path}: an unknown cbam-insert file layout {info!r}")
    if info["version"] > _PT_VERSION:
        raise CBAMInsertError(f"{path}: written by a newer cbam-insert (file version {info['version']}); upgrade")
    base, recipe, state = obj.get("base"), obj.get("recipe"), obj.get("state_dict")
    if not isinstance(base, nn.Module) or not isinstance(recipe, str) or _as_state_dict(state) is None:
        raise CBAMInsertError(f"{path}: a damaged cbam-insert file (base, recipe or state_dict missing)")
    _materialize(base)
    try:
        recipe_dict = json.loads(recipe)
    except ValueError:
        raise CBAMInsertError(f"{path}: a damaged cbam-insert file (its recipe is not JSON)") from None
    model = _replay(base, recipe_dict, path)
    _load_state(model, state, path, True)
    model.train(bool(info.get("training", False)))
    return model


_MAX_EXAMPLE_ELEMENTS = 1 << 28


def _replay(model: nn.Module, recipe: Any, path: Path) -> nn.Module:
    """``apply_recipe`` on ``model`` in place, after checking that the file's recipe is well formed.

    A recipe comes from a file, so a malformed one is the file's fault (one line, not a traceback),
    and its example inputs are bounded: they are allocated to replay the patch.
    """
    from .api import RECIPE_FORMAT, apply_recipe

    if not isinstance(recipe, dict) or recipe.get("format") != RECIPE_FORMAT or not isinstance(recipe.get("steps"), list):
        raise CBAMInsertError(f"{path}: its recipe is not a cbam-insert recipe")
    if not isinstance(recipe.get("version"), int) or recipe["version"] > 1:
        raise CBAMInsertError(f"{path}: its recipe has version {recipe.get('version')!r}; this cbam-insert reads 1")
    for i, step in enumerate(recipe["steps"]):
        ok = (
            isinstance(step, dict)
            and isinstance(step.get("after"), str)
            and isinstance(step.get("modules"), list)
            and isinstance(step.get("selection", {}), dict)
            and isinstance(step.get("cbam", {}), dict)
        )
        size = _elements(step.get("example_inputs")) if ok else None
        if size is None:
            raise CBAMInsertError(f"{path}: its recipe is malformed (step {i + 1})")
        if size > _MAX_EXAMPLE_ELEMENTS:
            raise CBAMInsertError(f"{path}: its recipe asks for example inputs too large to replay (step {i + 1})")
    try:
        return apply_recipe(model, recipe, inplace=True)
    except CBAMInsertError as exc:
        raise CBAMInsertError(f"{path}: {exc}") from None


def _elements(spec: Any) -> int | None:
    """Elements in a ``describe_inputs`` description, or ``None`` when it is not one."""
    if not isinstance(spec, dict) or len(spec) not in (1, 2):
        return None
    if "shape" in spec:
        shape, dtype = spec["shape"], spec.get("dtype")
        ok = isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
        return math.prod(shape) if ok and isinstance(getattr(torch, str(dtype), None), torch.dtype) else None
    items = spec.get("list", spec.get("tuple"))
    if len(spec) != 1 or not isinstance(items, list):
        return None
    sizes = [_elements(s) for s in items]
    return None if None in sizes else sum(sizes)  # type: ignore[arg-type]


def _materialize(model: nn.Module) -> None:
    """Give every meta-device parameter and buffer real (zero) CPU storage, in place."""
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                mod._parameters[name] = nn.Parameter(torch.zeros_like(p, device="cpu"), requires_grad=p.requires_grad)
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_meta:
                mod._buffers[name] = torch.zeros_like(b, device="cpu")


def _first_line(exc: BaseException) -> str:
    """The line of an exception's message that says what went wrong, without terminal escapes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    _, marker, reason = text.partition("WeightsUnpickler error:")  # torch.load's long weights-only message
    lines = (reason.split(". Please use")[0] if marker else text).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


# ----------------------------------------------------------------------------- saving


def save_model(
    model: nn.Module,
    path: str | Path,
    format: str | None = None,
    *,
    example_inputs: Any = None,
    force: bool = True,
) -> Path:
    """Save ``model`` to ``path`` in ``format`` (one of ``FORMATS``; inferred from the extension).

    * ``pt``: the whole model. A model patched by this tool is stored as its unpatched structure,
      its recipe and its weights (no pickled code); ``load_model`` rebuilds it with identical
      outputs. Other modules are pickled with ``torch.save``; a foreign ``fx.GraphModule`` is refused.
    * ``state-dict`` (``.pth``) and ``safetensors``: the weights, plus the recipe of a patched model
      (beside a ``.pth`` as ``NAME.pth.recipe.json``; in the metadata of a ``.safetensors``).
    * ``torchscript`` (``torch.jit.trace``), ``onnx`` (opset 18, torch.export-based exporter) and
      ``pt2`` (``torch.export``): the model in eval mode, captured on ``example_inputs`` (default: the
      recipe's example input, else one inferred from the first convolution).

    The write is atomic: a temporary file beside ``path``, renamed onto it when complete.
    ``force=False`` refuses an existing ``path``; the default ``True`` overwrites, because the CLI
    checks ``--force`` and refuses to write over its input before it calls this. Returns ``path``.
    """
    path = Path(path)
    fmt = _resolve_format(path, format)
    if not path.parent.is_dir():
        what = "is not a directory" if path.parent.exists() else "output directory does not exist"
        raise CBAMInsertError(f"{path.parent}: {what}")
    if path.is_dir():
        raise CBAMInsertError(f"{path}: is a directory; give a file name")
    if path.exists() and not force:
        raise CBAMInsertError(f"{path}: exists; pass --force (API: force=True) to overwrite")
    writer = _WRITERS[fmt]
    writer(model, path, example_inputs)
    return path


def _resolve_format(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise CBAMInsertError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
        return fmt
    guess = EXTENSIONS.get(path.suffix.lower())
    if guess is None:
        known = ", ".join(f"{ext}={f}" for ext, f in EXTENSIONS.items())
        raise CBAMInsertError(
            f"cannot tell the format from {path.name!r}; pass --format ({', '.join(FORMATS)}) or use an extension ({known})"
        )
    return guess


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + RECIPE_SUFFIX)


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    On any failure (an exception, KeyboardInterrupt) the temporary file is removed and ``path``
    is untouched. The file gets the usual permissions (``mkstemp`` makes it private).
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _recipe(model: nn.Module) -> dict[str, Any] | None:
    recipe = getattr(model, "cbam_recipe", None)
    return recipe if isinstance(recipe, dict) else None


def _carries_code(model: nn.Module) -> bool:
    return any(isinstance(m, (fx.GraphModule, torch.jit.ScriptModule)) for m in model.modules())


def _write_pt(model: nn.Module, path: Path, example_inputs: Any) -> None:
    base = model.__dict__.get("_cbam_base")
    recipe = _recipe(model)
    if base is not None and recipe is not None:
        if _carries_code(base):
            raise CBAMInsertError(
                "the model was already an fx.GraphModule or TorchScript module before patching; its structure "
                "cannot be stored without code: save it as state-dict, torchscript, onnx or pt2"
            )
        payload = {
            "cbam_insert": {"format": "pt", "version": _PT_VERSION, "training": model.training},
            "base": base,
            "recipe": json.dumps(recipe),
            "state_dict": model.state_dict(),
        }
        with _atomic(path) as tmp:
            torch.save(payload, tmp)
        return
    if _carries_code(model):
        raise CBAMInsertError(
            f"{type(model).__name__} holds an fx.GraphModule or TorchScript module not made by cbam-insert: "
            "pickling it would store code that runs when it is loaded; save it as state-dict, torchscript, onnx or pt2"
        )
    with _atomic(path) as tmp:
        torch.save(model, tmp)


def _write_state_dict(model: nn.Module, path: Path, example_inputs: Any) -> None:
    recipe = _recipe(model)
    side = _sidecar(path)
    with _atomic(path) as tmp:
        torch.save(model.state_dict(), tmp)
        if recipe is not None:
            with _atomic(side) as tmp_side:
                Path(tmp_side).write_text(json.dumps(recipe, indent=1), encoding="utf-8")
        elif side.exists():
            side.unlink()  # a stale recipe would be replayed on these plain weights


def _write_safetensors(model: nn.Module, path: Path, example_inputs: Any) -> None:
    _require("safetensors", "saving as safetensors")
    from safetensors.torch import save_model as st_save

    recipe = _recipe(model)
    meta = {"format": "pt"} | ({_RECIPE_KEY: json.dumps(recipe)} if recipe is not None else {})
    with _atomic(path) as tmp:
        st_save(model, tmp, metadata=meta)


def _export_inputs(model: nn.Module, example_inputs: Any) -> tuple[Any, ...]:
    from .api import make_inputs
    from .trace import infer_example_inputs

    if example_inputs is not None:
        return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    recipe = _recipe(model)
    if recipe is not None and recipe.get("steps"):
        param = next(model.parameters(), None)
        inputs = make_inputs(recipe["steps"][-1]["example_inputs"], device=param.device if param is not None else None)
        return inputs if isinstance(inputs, tuple) else (inputs,)
    return infer_example_inputs(model)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def _write_torchscript(model: nn.Module, path: Path, example_inputs: Any) -> None:
    inputs = _export_inputs(model, example_inputs)
    with _eval_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore", (torch.jit.TracerWarning, FutureWarning))
        try:
            traced = torch.jit.trace(model, inputs, check_trace=False, strict=False)
        except Exception as exc:
            raise CBAMInsertError(f"torch.jit.trace failed ({_first_line(exc)}); try --format onnx or pt2") from exc
        with _atomic(path) as tmp:
            torch.jit.save(traced, tmp)


def _write_onnx(model: nn.Module, path: Path, example_inputs: Any) -> None:
    _require("onnxscript", "ONNX export")
    inputs = _export_inputs(model, example_inputs)
    with _eval_mode(model), warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        with _atomic(path) as tmp:
            try:
                torch.onnx.export(model, inputs, tmp, dynamo=True, external_data=False, opset_version=_ONNX_OPSET,
                                  verbose=False)  # fmt: skip
            except Exception as exc:
                raise CBAMInsertError(f"ONNX export failed ({_first_line(exc)}); try --format torchscript") from exc


def _write_pt2(model: nn.Module, path: Path, example_inputs: Any) -> None:
    inputs = _export_inputs(model, example_inputs)
    with _eval_mode(model):
        try:
            program = torch.export.export(model, inputs)
        except Exception as exc:
            raise CBAMInsertError(f"torch.export failed ({_first_line(exc)}); try --format torchscript") from exc
        with _atomic(path) as tmp:
            torch.export.save(program, tmp)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the progress lines the ONNX exporter prints to stdout."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


_WRITERS: dict[str, Callable[[nn.Module, Path, Any], None]] = {
    "pt": _write_pt,
    "state-dict": _write_state_dict,
    "safetensors": _write_safetensors,
    "torchscript": _write_torchscript,
    "onnx": _write_onnx,
    "pt2": _write_pt2,
}
