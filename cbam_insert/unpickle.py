"""The safe-unpickling policy: which references of a ``torch.save`` pickle may load without trust.

See docs/security.md for the threat model. ``unpickle(path, kind, trust)`` is the only entry point
``load`` uses.
"""

from __future__ import annotations

import _compat_pickle  # the Python 2 names protocol-2 pickles use (__builtin__, commands)
import functools
import importlib
import pickletools
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from . import patched
from .errors import CBAMInsertError, first_line
from .formats import TRUST_HINT

__all__ = ["SafePickle", "unpickle"]


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
                f"re-save it with torch.save's default protocol, or {TRUST_HINT}"
            )
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(self.path)))
        scan = _scan(data)
        module_classes: dict[str, type] = {}
        helpers: dict[str, Any] = {}
        for full, (mod, name) in sorted(scan.globals.items()):
            if full not in unsafe and f"{mod}.{name}" not in unsafe:
                continue
            if full == patched.ENTRY_POINT:  # this tool's .pt: resolved to a check that returns its data
                self.allowed.append((patched.payload_only, full))
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
                f"without trust); {TRUST_HINT}"
            )
        with torch.serialization.safe_globals(self.allowed):
            try:
                return torch.load(self.path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise CBAMInsertError(f"{self.path}: cannot be read safely ({first_line(exc)}); {TRUST_HINT}") from exc


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
            return None, f"cannot import {mod}: {first_line(exc)}"
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
        raise CBAMInsertError(f"its pickle is corrupt or truncated ({first_line(exc)})") from exc
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


def unpickle(path: Path, kind: str, trust: bool) -> Any:
    if trust:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise CBAMInsertError(f"{path}: cannot be read ({type(exc).__name__}: {first_line(exc)})") from exc
    if kind == "legacy":
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CBAMInsertError(
                f"{path}: an old-format (pre-zip) pickle that the safe loader cannot read ({first_line(exc)}); "
                f"re-save it with a current torch, or {TRUST_HINT}"
            ) from exc
    try:
        policy = SafePickle(path)
        policy.check()
    except CBAMInsertError as exc:
        raise CBAMInsertError(f"{path}: {exc}" if not str(exc).startswith(str(path)) else str(exc)) from None
    except Exception as exc:
        raise CBAMInsertError(f"{path}: truncated or corrupt ({first_line(exc)})") from exc
    return policy.load()
