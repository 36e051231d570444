"""Reading a ``torch.save`` file without trusting it (docs/security.md has the threat model).

``read_untrusted(path)`` interprets the file's pickle with this module's own opcode interpreter
instead of Python's or PyTorch's unpickler, so what runs is decided here, not by the file:

* No callable named by the file is called, except the reviewed data-only helpers in ``_CALLS``
  (tensor, parameter, ``torch.Size``, ``torch.device``, ``OrderedDict``, ``set``, bytes), each
  re-implemented or argument-checked here: a tensor rebuild's "type" argument must be a tensor
  type, a rebuild's "function" argument must itself be a reviewed rebuild.
* A class named by the file is only ever restored: an instance is created with
  ``object.__new__`` (``tuple.__new__`` for a named tuple; an enum member is looked up by value)
  and filled by writing its ``__dict__``. torch.nn's own classes get the attribute defaults their
  (reviewed) ``__setstate__`` would set; a class with its own ``__setstate__``, ``__new__``,
  ``__del__``, a custom metaclass, or a builtin base other than ``object`` is refused, and so is a
  ``GraphModule``, ``ScriptModule`` or compiled (``OptimizedModule``) module: they carry code.
* No callable is stored where the model could later call it, except ``_STORABLE`` (torch.nn norm
  classes, torch's activation functions, two torchvision helpers) and ``functools.partial`` of a
  norm class with small keyword arguments. Instances of non-module classes with ``__call__`` are
  refused unless reviewed (``_CALLABLE_HELPERS``).
* A module is imported only after every name in the file passed ``vet_global``: found on disk
  without importing (``importlib.machinery.PathFinder``), a Python source file listed in the
  RECORD of an installed distribution, outside the working directory and ``sys.path[0]``, not
  ``__main__``, not the standard library, and the name defined there by a ``class``/``def``
  statement (read with ``ast``). A file that names anything else is refused before any import.
* Every size the file controls is bounded first (``LIMITS``): the pickle's size and opcode count,
  integers, tensor dimensions, each storage against the bytes the archive really holds (stored,
  not compressed), the logical size of all tensors against the stored bytes, and nesting depth.

Everything raises ``UnsafeFile`` (a ``CBAMInsertError``) with one line; names from the file are
escaped (``escape``).
"""

from __future__ import annotations

import _compat_pickle
import ast
import collections
import enum
import functools
import importlib
import importlib.machinery
import math
import mmap
import os
import pickletools
import struct
import sys
import types
import unicodedata
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import patched
from .errors import CBAMInsertError, escape, first_line
from .formats import TRUST_HINT

__all__ = [
    "LIMITS",
    "Limits",
    "UnsafeFile",
    "escape",
    "read_untrusted",
    "read_untrusted_legacy",
    "unpickle",
    "vet_global",
]


class UnsafeFile(CBAMInsertError):
    """A file the safe reader refuses (``refused``) or cannot read (one line, names escaped)."""

    def __init__(self, message: str, refused: bool = True) -> None:
        super().__init__(message)
        self.refused = refused


def _corrupt(what: str) -> UnsafeFile:
    return UnsafeFile(what, refused=False)


def unpickle(path: Path, kind: str, trust: bool) -> Any:
    """The object a ``torch.save`` file holds: ``kind`` ``zip`` or ``legacy``; ``trust`` unpickles fully."""
    if trust:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - whatever a trusted file's code raises
            raise CBAMInsertError(f"{path}: cannot be read ({type(exc).__name__}: {escape(first_line(exc))})") from None
    try:
        loaded = read_untrusted(path) if kind == "zip" else read_untrusted_legacy(path)
    except UnsafeFile as exc:
        hint = f"; {TRUST_HINT}" if exc.refused else ""
        raise CBAMInsertError(f"{path}: {exc}{hint}") from None
    return loaded.obj


@dataclass(frozen=True)
class Limits:
    """Bounds on what a file may make the reader do (see docs/security.md)."""

    pickle_bytes: int = 16 << 20  # the decompressed pickle (data.pkl); torchvision's largest is 0.35 MB
    opcodes: int = 2_000_000  # ~4 s to scan here; torchvision's efficientnet_b7 has 0.15 M
    int_bytes: int = 32  # LONG1/LONG4 integers up to 256 bits
    depth: int = 200  # nesting of containers and objects (deepcopy needs ~2-3 frames per level)
    tensor_dims: int = 32
    logical_slack: int = 256 << 20  # tensors may view more than the stored bytes (expand, ties): 2x + this
    partial_int: int = 1 << 16  # an integer argument of a stored functools.partial


LIMITS = Limits()

# ----------------------------------------------------------------------------- escaping


def _is_clean_name(text: str) -> bool:
    return all(part.isidentifier() for part in text.split("."))


# ----------------------------------------------------------------------------- deciding on a name

_STDLIB_REVIEWED = {
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("builtins", "bytearray"),
    ("builtins", "object"),
    ("_codecs", "encode"),
    ("copyreg", "_reconstructor"),
    ("functools", "partial"),
}


def _norm_name(mod: str, name: str) -> tuple[str, str]:
    """Python 2 names (``__builtin__.set``, ``copy_reg``) as Python 3 reads them."""
    if (mod, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(mod, name)]
    return _compat_pickle.IMPORT_MAPPING.get(mod, mod), name


def _untrusted_roots() -> list[Path]:
    """The working directory and the script's directory: what ``sys.path`` may add implicitly."""
    roots = [Path.cwd().resolve()]
    if sys.path and sys.path[0]:
        roots.append(Path(sys.path[0]).resolve())
    return roots


def _search_path() -> list[str]:
    bad = _untrusted_roots()
    out = []
    for entry in sys.path:
        if not entry:
            continue
        p = Path(entry).resolve()
        if any(p == b for b in bad):
            continue
        out.append(str(p))
    return out


@functools.cache
def _dist_files(top: str) -> frozenset[str]:
    """Absolute paths of every file the distributions providing ``top`` installed (their RECORD)."""
    from importlib.metadata import distribution, packages_distributions

    files: set[str] = set()
    bad = _untrusted_roots()
    for dist_name in packages_distributions().get(top, []):
        try:
            dist = distribution(dist_name)
        except Exception:  # noqa: BLE001, S112 - a broken install provides nothing
            continue
        base = Path(str(dist.locate_file(""))).resolve()
        if base in bad:  # a .dist-info lying in the working directory is not an installation
            continue
        for f in dist.files or []:
            files.add(os.path.normpath(str(base / str(f))))
    return frozenset(files)


def _specs(mod: str) -> tuple[list[Any], str]:
    """The specs of ``mod`` and of its packages not yet imported, found without importing anything.

    Every one must be a Python source file (or a namespace package) that an installed distribution
    listed in its RECORD, outside the working directory and the script's directory.
    """
    parts = mod.split(".")
    path: list[str] | None = _search_path()
    specs = []
    for i in range(len(parts)):
        name = ".".join(parts[: i + 1])
        if name in sys.modules:
            loc = getattr(sys.modules[name], "__path__", None)
            path = list(loc) if loc is not None else None
            continue
        if path is None:
            return [], f"{parts[i - 1]} is not a package"
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return [], f"module {name} is not installed"
        origin = spec.origin if spec.has_location else None
        if origin is None and spec.submodule_search_locations is None:
            return [], f"module {name} is not a Python source file"
        if origin is not None:
            origin = os.path.normpath(str(Path(origin).resolve()))
            if not origin.endswith(".py"):
                return [], f"module {name} is not a Python source file (it cannot be checked before importing it)"
            if origin not in _dist_files(parts[0]):
                return [], f"module {name} is not a file of an installed distribution"
        specs.append(spec)
        path = list(spec.submodule_search_locations) if spec.submodule_search_locations is not None else None
    return specs, ""


def _import_vetted(mod: str) -> Any:
    """Import ``mod`` from exactly the files ``_specs`` checked, with ``sys.path`` free of the cwd."""
    import importlib.util

    if mod in sys.modules:
        return sys.modules[mod]
    specs, why = _specs(mod)
    if why:
        raise UnsafeFile(f"cannot import {escape(mod)}: {why}")
    saved = list(sys.path)
    bad = {str(p) for p in _untrusted_roots()}
    sys.path[:] = [p for p in sys.path if p and str(Path(p).resolve()) not in bad]
    try:
        for spec in specs:
            if spec.name in sys.modules:  # imported by a parent package's __init__
                continue
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(spec.name, None)
                raise
            parent, _, leaf = spec.name.rpartition(".")
            if parent and parent in sys.modules:
                setattr(sys.modules[parent], leaf, module)
    finally:
        sys.path[:] = saved
    return sys.modules[mod]


def _defines(source_file: str, qualname: str) -> bool:
    """Whether ``source_file`` has a ``class``/``def`` statement for ``qualname`` at module level."""
    try:
        tree = ast.parse(Path(source_file).read_bytes())
    except (OSError, SyntaxError, ValueError):
        return False

    def defs(body: list[ast.stmt]) -> dict[str, ast.AST]:
        out: dict[str, ast.AST] = {}
        for node in body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                out[node.name] = node
            elif isinstance(node, (ast.If, ast.Try)):  # version guards, optional imports
                for block in [node.body, node.orelse, getattr(node, "finalbody", [])] + [
                    h.body for h in getattr(node, "handlers", [])
                ]:
                    out.update(defs(block))
        return out

    scope: list[ast.stmt] = tree.body
    for part in qualname.split("."):
        node = defs(scope).get(part)
        if node is None:
            return False
        scope = node.body if isinstance(node, ast.ClassDef) else []
    return True


def vet_global(mod: str, name: str) -> str:
    """Why the name ``mod.name`` may not be resolved, or ``""`` when it may (nothing is imported)."""
    if not (_is_clean_name(mod) and _is_clean_name(name)):
        return "not a Python name"
    if (mod, name) in _STDLIB_REVIEWED:
        return ""
    parts = mod.split(".")
    if "__main__" in parts or mod == "__mp_main__":
        return "a __main__ module (a script, not an installed library)"
    if parts[0] in sys.stdlib_module_names or parts[0] in ("builtins", "__builtin__"):
        return "the standard library defines no model classes"
    if mod in sys.modules:
        return ""  # already imported by the program: resolving it imports nothing
    specs, why = _specs(mod)
    if why:
        return why
    if (
        not specs
        or specs[-1].origin is None
        or not _defines(os.path.normpath(str(Path(specs[-1].origin).resolve())), name)
    ):
        return f"{mod} does not define {name} with a class or def statement"
    return ""


def _resolve(mod: str, name: str) -> Any:
    """Import ``mod`` (already vetted) and return ``mod.name``, defined there under that name."""
    try:
        module = _import_vetted(mod)
    except UnsafeFile:
        raise
    except BaseException as exc:  # noqa: BLE001 - SystemExit from a module's import too
        raise UnsafeFile(f"cannot import {escape(mod)}: {escape(first_line(exc))}") from None
    obj: Any = module
    for part in name.split("."):
        space = getattr(obj, "__dict__", None)
        if not isinstance(space, (dict, types.MappingProxyType)) or part not in space:
            raise UnsafeFile(f"{escape(mod)} has no {escape(name)}")
        obj = space[part]
    if (isinstance(obj, type) or callable(obj)) and (
        getattr(obj, "__module__", None) != mod or getattr(obj, "__qualname__", None) != name
    ):
        raise UnsafeFile(f"{escape(mod)}.{escape(name)} is defined elsewhere (an alias, refused)")
    return obj


# ----------------------------------------------------------------------------- class rules

_COPY_HOOKS = ("__getstate__", "__reduce__", "__reduce_ex__", "__deepcopy__", "__copy__")
_MODULE_HOOKS = ("__getattr__", "__getattribute__", "__setattr__", "__delattr__") + _COPY_HOOKS
_CODE_CLASSES: tuple[type, ...] = (torch.fx.GraphModule, torch.jit.ScriptModule)
_TORCH_NN = "torch.nn.modules."


def _defined_in(cls: type, attr: str) -> type | None:
    for klass in type.__getattribute__(cls, "__mro__"):
        if attr in klass.__dict__:
            return klass
    return None


def _torch_nn(klass: type | None) -> bool:
    return klass is None or klass is object or klass.__module__.startswith(_TORCH_NN)


def _code_classes() -> tuple[type, ...]:
    extra: list[type] = []
    dyn = sys.modules.get("torch._dynamo.eval_frame")
    if dyn is not None and isinstance(getattr(dyn, "OptimizedModule", None), type):
        extra.append(dyn.OptimizedModule)
    return _CODE_CLASSES + tuple(extra)


def _class_problem(cls: type) -> str:
    """Why instances of ``cls`` cannot be restored without running its code, or ``""``."""
    if type(cls) not in (type, enum.EnumMeta) and not (
        type(cls).__module__ == "abc" and type(cls).__name__ == "ABCMeta"
    ):
        return "a class with a custom metaclass"
    if issubclass(cls, _code_classes()):
        return "a module class that carries code (GraphModule, TorchScript or torch.compile)"
    if issubclass(cls, enum.Enum):  # members are looked up by value, never created
        member_call = _defined_in(cls, "__call__")
        return (
            ""
            if member_call in (None, object) or member_call.__module__ == "enum"
            else "an enum whose members are callable"
        )
    deleter = _defined_in(cls, "__del__")
    if deleter is not None and deleter is not object:
        return "a class with a finalizer (__del__ would run its code)"
    setstate = _defined_in(cls, "__setstate__")
    if setstate is not None and setstate is not object and not _torch_nn(setstate):
        return "a class with its own __setstate__ (restoring it runs its code)"
    if issubclass(cls, nn.Module):
        for dunder in _MODULE_HOOKS:  # the tool's own deepcopy and setattr on modules would run them
            klass = _defined_in(cls, dunder)
            if not _torch_nn(klass):
                return f"a module class with its own {dunder}"
        return ""
    for dunder in _COPY_HOOKS:
        klass = _defined_in(cls, dunder)
        if klass is not None and klass is not object:
            return f"a class with its own {dunder} (copying the model would run it)"
    if _namedtuple(cls):
        return ""
    builtin_bases = [k for k in cls.__mro__ if not (k.__flags__ & (1 << 9)) and k is not object]  # not heap types
    if builtin_bases:
        return f"a subclass of {builtin_bases[0].__name__}"
    if _defined_in(cls, "__call__") is not None and f"{cls.__module__}.{cls.__qualname__}" not in _CALLABLE_HELPERS:
        return "a callable class that is not a module (the model could call it)"
    return ""


def _namedtuple(cls: type) -> bool:
    if not (isinstance(cls, type) and issubclass(cls, tuple)):
        return False
    fields = getattr(cls, "_fields", None)
    heap = all((k.__flags__ & (1 << 9)) for k in cls.__mro__ if k not in (tuple, object))
    return heap and isinstance(fields, tuple) and all(isinstance(f, str) for f in fields)


_CALLABLE_HELPERS = frozenset({
    # torchvision detection helpers: plain classes holding numbers, called by the model on tensors
    "torchvision.models.detection._utils.BalancedPositiveNegativeSampler",
    "torchvision.models.detection._utils.Matcher",
    "torchvision.models.detection._utils.SSDMatcher",
    "torchvision.ops.poolers.LevelMapper",
})  # fmt: skip

# torch.nn classes whose __setstate__ only fills defaults for old files: the same defaults, written directly
_NN_DEFAULTS: dict[str, dict[str, Any]] = {
    "torch.nn.modules.pooling.AvgPool3d": {"padding": 0, "ceil_mode": False, "count_include_pad": True},
    "torch.nn.modules.conv._ConvNd": {"padding_mode": "zeros"},
    "torch.nn.modules.activation.LogSoftmax": {"dim": None},
    "torch.nn.modules.activation.Softmax": {"dim": None},
    "torch.nn.modules.activation.Softmin": {"dim": None},
    "torch.nn.modules.activation.MultiheadAttention": {"_qkv_same_embed_dim": True},
    "torch.nn.modules.upsampling.Upsample": {"recompute_scale_factor": True},
    "torch.nn.modules.transformer.TransformerEncoderLayer": {"activation": torch.nn.functional.relu},
    "torch.nn.modules.transformer.TransformerDecoderLayer": {"activation": torch.nn.functional.relu},
}
_MODULE_DEFAULTS = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_backward_pre_hooks",
)  # fmt: skip
_HOOK_DICTS = frozenset(_MODULE_DEFAULTS) | {"_backward_hooks", "_forward_hooks"}
_HOOK_FLAGS = frozenset({"_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"})
_REVIEWED_HOOKS = frozenset({
    # this package's Ultralytics integration: applies the module's own ``cbam`` child to its output
    "cbam_insert.integrations.ultralytics.CBAMHook",
})  # fmt: skip


def _restore_module(inst: nn.Module, state: dict[str, Any]) -> None:
    """What ``nn.Module.__setstate__`` (and torch.nn's reviewed overrides) do, without calling them."""
    for key, hooks in state.items():
        if key not in _HOOK_DICTS or not hooks:
            continue
        if not isinstance(hooks, dict):
            raise UnsafeFile(f"a module's {key} is not a dict")
        for hook in hooks.values():
            if key in _HOOK_FLAGS and isinstance(hook, bool):
                continue  # which hooks take kwargs / always run: flags, not code
            kind = type(hook)
            if f"{kind.__module__}.{kind.__qualname__}" not in _REVIEWED_HOOKS:
                raise UnsafeFile(f"a module carries {key} with a {escape(kind.__name__)} (hooks are code the model would call)")
    d = object.__getattribute__(inst, "__dict__")
    d.update(state)
    for key in _MODULE_DEFAULTS:
        d.setdefault(key, collections.OrderedDict())
    d.setdefault("_non_persistent_buffers_set", set())
    d.setdefault("_is_full_backward_hook", None)
    for klass in type(inst).__mro__:
        for k, v in _NN_DEFAULTS.get(f"{klass.__module__}.{klass.__qualname__}", {}).items():
            d.setdefault(k, v)
    if isinstance(inst, nn.RNNBase):
        _restore_rnn(inst, d)
    for key in ("_modules", "_parameters", "_buffers"):
        table = d.get(key)
        if not isinstance(table, dict):
            raise UnsafeFile(f"a module's {key} is not a dict")
        for name, value in table.items():
            if not isinstance(name, str) or not name or "." in name or not _printable(name):
                raise UnsafeFile(f"a module has a {key[1:-1]} named {escape(repr(name))}")
            if key == "_modules" and value is not None and not isinstance(value, nn.Module):
                raise UnsafeFile(f"submodule {escape(name)} is a {type(value).__name__}, not a module")
            if key != "_modules" and value is not None and not isinstance(value, torch.Tensor):
                raise UnsafeFile(f"{key[1:-2]} {escape(name)} is a {type(value).__name__}, not a tensor")


def _restore_rnn(inst: nn.RNNBase, d: dict[str, Any]) -> None:
    import weakref

    names = d.get("_flat_weights_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UnsafeFile("an RNN module without the list of its weight names (a file from torch < 1.8?)")
    params = d.get("_parameters", {})
    d["_flat_weights"] = [params.get(n) for n in names]
    d["_flat_weight_refs"] = [weakref.ref(w) if w is not None else None for w in d["_flat_weights"]]
    d.setdefault("proj_size", 0)


def _printable(text: str) -> bool:
    return all(ch.isprintable() and unicodedata.category(ch) != "Cf" for ch in text)


# ----------------------------------------------------------------------------- the interpreter


class _Global:
    """A name the file referenced, resolved; what it may do is decided where the pickle uses it."""

    __slots__ = ("full", "obj")

    def __init__(self, full: str, obj: Any) -> None:
        self.full, self.obj = full, obj


class _Partial:
    """``functools.partial`` between its creation and its ``BUILD`` (REDUCE/NEWOBJ, then state)."""

    __slots__ = ("func",)

    def __init__(self, func: Any) -> None:
        self.func = func


_MARK = object()
_DTYPE_TYPES = (torch.dtype, torch.layout, torch.memory_format, torch.qscheme)
_PRIMITIVE = (str, int, float, bool, type(None), bytes, complex)

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}  # fmt: skip


def _norm_classes() -> tuple[type, ...]:
    m = nn.modules
    return (m.batchnorm._NormBase, m.normalization.LayerNorm, m.normalization.GroupNorm,
            m.normalization.LocalResponseNorm, getattr(m.normalization, "RMSNorm", m.normalization.LayerNorm))  # fmt: skip


def _storable_callable(obj: Any, full: str) -> bool:
    """Whether a callable may sit in the model (the model's code may call it): reviewed ones only."""
    if isinstance(obj, type) and issubclass(obj, _norm_classes()):
        base = next(k for k in obj.__mro__ if k.__module__.startswith(_TORCH_NN))
        return obj.__init__ is base.__init__ and _class_problem(obj) == ""  # type: ignore[misc]
    if isinstance(obj, type) and obj.__module__.startswith("torch.nn.modules.activation"):
        return True  # nn.ReLU etc. kept as a layer factory: built from a few numbers
    return full in _STORABLE_FUNCTIONS


_STORABLE_FUNCTIONS = frozenset(
    [f"torch.nn.functional.{n}" for n in (
        "relu", "relu6", "gelu", "silu", "mish", "elu", "selu", "celu", "leaky_relu", "hardswish", "hardsigmoid",
        "hardtanh", "sigmoid", "tanh", "softplus", "softmax", "log_softmax", "glu", "logsigmoid", "prelu",
        "layer_norm", "group_norm", "batch_norm", "dropout", "interpolate", "adaptive_avg_pool2d", "avg_pool2d",
        "max_pool2d")]
    + [f"torch._C._nn.{n}" for n in ("gelu", "silu", "mish", "elu", "leaky_relu", "hardswish", "hardsigmoid",
                                     "hardtanh", "softplus", "relu6", "log_sigmoid")]
    + [f"torch.{n}" for n in ("relu", "sigmoid", "tanh", "add", "mul", "cat", "flatten", "softmax")]
    + ["torchvision.ops.boxes.box_iou", "torchvision.models.optical_flow.raft._pass_through_h",
       "torchvision.ops.misc.SqueezeExcitation"]
)  # fmt: skip


class _Reader:
    """One pass of the interpreter over ``data`` (after every name in it was vetted)."""

    def __init__(
        self, data: bytes, storage: Callable[[tuple[Any, ...]], Any], stored: Callable[[], int] | None
    ) -> None:
        self.data = data
        self.storage = storage
        self.stored = stored  # bytes of tensor data read so far; None: checked by the caller
        self.module_pids = False
        self.meta_elements = 0
        self.logical_bytes = 0
        self.globals: dict[tuple[str, str], _Global] = {}
        self.restored: dict[int, Any] = {}  # id -> instance created by NEWOBJ, awaiting BUILD
        self.tuple_has_global: set[int] = set()
        self.tuples: dict[int, tuple[Any, ...]] = {}
        self.converted: dict[int, tuple[Any, ...]] = {}

    def logical(self, nbytes: int) -> None:
        """Count a tensor's logical size against the bytes the file stores (views, ties: 2x + slack)."""
        self.logical_bytes += nbytes
        if self.stored is not None and self.logical_bytes > 2 * self.stored() + LIMITS.logical_slack:
            raise UnsafeFile(
                f"its tensors view {self.logical_bytes} bytes of the {self.stored()} bytes it stores "
                f"(at most twice that plus {LIMITS.logical_slack >> 20} MiB)"
            )

    # -- values ---------------------------------------------------------------------------------
    def store(self, value: Any) -> Any:
        """``value`` as it may be kept in the result: names and pending partials are checked here."""
        if isinstance(value, _Global):
            obj = value.obj
            if isinstance(obj, _DTYPE_TYPES):
                return obj
            if isinstance(obj, enum.Enum) and _class_problem(type(obj)) == "":
                return obj
            if callable(obj) and _storable_callable(obj, value.full):
                return obj
            raise UnsafeFile(f"it stores {escape(value.full)} where the model could call it")
        if isinstance(value, _Partial):
            raise UnsafeFile("a functools.partial without its arguments")
        if isinstance(value, tuple) and id(value) in self.tuple_has_global:
            got = self.converted.get(id(value))
            if got is None:
                got = tuple(self.store(v) for v in value)
                self.converted[id(value)] = got
            return got
        return value

    def make_tuple(self, items: list[Any]) -> tuple[Any, ...]:
        t = tuple(items)
        if any(
            isinstance(v, (_Global, _Partial)) or (isinstance(v, tuple) and id(v) in self.tuple_has_global) for v in t
        ):
            self.tuple_has_global.add(id(t))
            self.tuples[id(t)] = t  # keep it alive: ids must stay unique
        return t

    def key(self, k: Any) -> Any:
        k = self.store(k)
        if isinstance(k, (*_PRIMITIVE, *_DTYPE_TYPES)):
            return k
        if isinstance(k, tuple) and all(self.key(x) is x for x in k):
            return k
        if isinstance(k, enum.Enum) and _defined_in(type(k), "__hash__") in (enum.Enum, object, None):
            return k
        raise UnsafeFile(f"a dict key or set item of type {escape(type(k).__name__)} (hashing it could run code)")

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> Any:
        stack: list[Any] = []
        marks: list[int] = []
        memo: dict[int, Any] = {}
        ops = 0
        for op, arg, _pos in pickletools.genops(self.data):
            ops += 1
            if ops > LIMITS.opcodes:
                raise UnsafeFile(f"its pickle has more than {LIMITS.opcodes} operations")
            name = op.name
            if name in ("PROTO", "FRAME"):
                continue
            if name == "STOP":
                if len(stack) != 1 or marks:
                    raise _corrupt("its pickle is corrupt (the stack is not one value at STOP)")
                return self.store(stack[0])
            if name in ("NONE",):
                stack.append(None)
            elif name in ("NEWTRUE", "NEWFALSE"):
                stack.append(name == "NEWTRUE")
            elif name in ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT"):
                if (
                    name in ("LONG1", "LONG4", "LONG", "INT")
                    and isinstance(arg, int)
                    and arg.bit_length() > 8 * LIMITS.int_bytes
                ):
                    raise UnsafeFile(f"its pickle holds an integer of more than {8 * LIMITS.int_bytes} bits")
                stack.append(arg)
            elif name in ("STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
                          "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"):  # fmt: skip
                stack.append(arg)
            elif name == "BYTEARRAY8":
                stack.append(bytearray(arg))
            elif name == "EMPTY_LIST":
                stack.append([])
            elif name == "EMPTY_DICT":
                stack.append({})
            elif name == "EMPTY_SET":
                stack.append(set())
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name == "MARK":
                marks.append(len(stack))
            elif name in ("TUPLE", "LIST", "DICT", "FROZENSET"):
                start = marks.pop()
                items = stack[start:]
                del stack[start:]
                if name == "TUPLE":
                    stack.append(self.make_tuple(items))
                elif name == "LIST":
                    stack.append([self.store(v) for v in items])
                elif name == "FROZENSET":
                    stack.append(frozenset(self.key(v) for v in items))
                else:
                    if len(items) % 2:
                        raise _corrupt("its pickle is corrupt (odd DICT)")
                    stack.append({self.key(items[i]): self.store(items[i + 1]) for i in range(0, len(items), 2)})
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                if len(stack) < n:
                    raise _corrupt("its pickle is corrupt (stack underflow)")
                items = stack[len(stack) - n :]
                del stack[len(stack) - n :]
                stack.append(self.make_tuple(items))
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo[int(arg)])
            elif name == "POP":
                if marks and marks[-1] == len(stack):
                    marks.pop()
                else:
                    stack.pop()
            elif name == "POP_MARK":
                del stack[marks.pop() :]
            elif name == "DUP":
                stack.append(stack[-1])
            elif name in ("APPEND", "APPENDS"):
                if name == "APPEND":
                    items = [stack.pop()]
                else:
                    start = marks.pop()
                    items = stack[start:]
                    del stack[start:]
                target = stack[-1]
                if type(target) is not list:
                    raise UnsafeFile(f"it appends to a {escape(type(target).__name__)} (that calls its code)")
                target.extend(self.store(v) for v in items)
            elif name in ("SETITEM", "SETITEMS"):
                if name == "SETITEM":
                    items = stack[-2:]
                    del stack[-2:]
                else:
                    start = marks.pop()
                    items = stack[start:]
                    del stack[start:]
                target = stack[-1]
                if type(target) not in (dict, collections.OrderedDict) or len(items) % 2:
                    raise UnsafeFile(f"it sets items of a {escape(type(target).__name__)} (that calls its code)")
                for i in range(0, len(items), 2):
                    target[self.key(items[i])] = self.store(items[i + 1])
            elif name == "ADDITEMS":
                start = marks.pop()
                items = stack[start:]
                del stack[start:]
                if type(stack[-1]) is not set:
                    raise UnsafeFile("it adds items to something that is not a set")
                stack[-1].update(self.key(v) for v in items)
            elif name in ("GLOBAL", "STACK_GLOBAL"):
                if name == "GLOBAL":
                    mod, _, attr = str(arg).partition(" ")
                else:
                    attr, mod = stack.pop(), stack.pop()
                    if not (isinstance(mod, str) and isinstance(attr, str)):
                        raise UnsafeFile("its pickle is corrupt (STACK_GLOBAL of non-strings)")
                stack.append(self.global_(mod, attr))
            elif name == "REDUCE":
                args = stack.pop()
                stack[-1] = self.reduce(stack[-1], args)
            elif name in ("NEWOBJ", "NEWOBJ_EX"):
                if name == "NEWOBJ_EX":
                    kwargs = stack.pop()
                    if kwargs:
                        raise UnsafeFile("it creates an object with keyword arguments to __new__")
                args = stack.pop()
                stack[-1] = self.newobj(stack[-1], args)
            elif name == "BUILD":
                state = stack.pop()
                stack[-1] = self.build(stack[-1], state)
            elif name in ("BINPERSID", "PERSID"):
                pid = stack.pop() if name == "BINPERSID" else arg
                if not isinstance(pid, tuple):
                    raise UnsafeFile("its pickle has a persistent id that is not a tuple")
                if self.module_pids and len(pid) == 4 and pid[0] == "module" and isinstance(pid[1], _Global):
                    stack.append(pid[1])  # an old-format file names a module class this way (its source is ignored)
                else:
                    stack.append(self.storage(self.unwrap_pid(pid)))
            else:
                raise UnsafeFile(f"its pickle uses the opcode {name}, which the safe reader does not read")
        raise _corrupt("its pickle is truncated (no STOP)")

    def unwrap_pid(self, pid: tuple[Any, ...]) -> tuple[Any, ...]:
        out = []
        for v in pid:
            if isinstance(v, _Global):
                obj = v.obj
                dtype = _STORAGE_DTYPES.get(v.full.rpartition(".")[2]) if v.full.startswith("torch.") else None
                if v.full == "torch.storage.UntypedStorage" or v.full == "torch.UntypedStorage":
                    dtype = torch.uint8
                if dtype is None or not isinstance(obj, type):
                    raise UnsafeFile(f"a storage of type {escape(v.full)}")
                out.append(dtype)
            else:
                out.append(v)
        return tuple(out)

    def global_(self, mod: str, attr: str) -> _Global:
        key = _norm_name(mod, attr)
        got = self.globals.get(key)
        if got is None and f"{key[0]}.{key[1]}" == patched.ENTRY_POINT:  # a name only: never resolved, never called
            got = self.globals[key] = _Global(patched.ENTRY_POINT, None)
        if got is None:
            why = vet_global(*key)
            if why:
                raise UnsafeFile(f"it references {escape(key[0])}.{escape(key[1])} ({why})")
            full = f"{key[0]}.{key[1]}"
            got = _Global(full, _resolve(*key))
            self.globals[key] = got
        return got

    # -- calls ----------------------------------------------------------------------------------
    def reduce(self, func: Any, args: Any) -> Any:
        if isinstance(func, _Global):
            handler = _CALLS.get(func.full)
            if handler is not None:
                if not isinstance(args, tuple):
                    raise UnsafeFile(f"{escape(func.full)} called with arguments that are not a tuple")
                return handler(self, *args)
            if func.full == "functools.partial":
                if len(args) != 1:
                    raise UnsafeFile("a functools.partial built with its arguments at once")
                return _Partial(args[0])
            obj = func.obj
            if isinstance(obj, enum.EnumMeta):
                return self.enum_member(func, args)
            raise UnsafeFile(f"it calls {escape(func.full)} (only data is restored without trust)")
        raise UnsafeFile(f"it calls a {escape(type(func).__name__)} (only data is restored without trust)")

    def enum_member(self, func: _Global, args: Any) -> Any:
        cls = func.obj
        why = _class_problem(cls)
        if why or not isinstance(args, tuple) or len(args) != 1 or not isinstance(args[0], _PRIMITIVE):
            raise UnsafeFile(f"enum {escape(func.full)} restored from something that is not a plain value ({why})")
        value = args[0]
        for member in cls.__dict__["_member_map_"].values():
            v = object.__getattribute__(member, "_value_")
            if type(v) is type(value) and v == value:
                return member
        raise UnsafeFile(f"enum {escape(func.full)} has no member with the value {escape(repr(value))}")

    def newobj(self, cls: Any, args: Any) -> Any:
        if not isinstance(cls, _Global):
            raise UnsafeFile("it creates an object of something that is not a named class")
        if cls.full == "functools.partial":
            if not isinstance(args, tuple) or len(args) != 1:
                raise UnsafeFile("a functools.partial created with unusual arguments")
            return _Partial(args[0])
        return self.instance(cls, args)

    def instance(self, cls: _Global, args: Any) -> Any:
        klass = cls.obj
        if not isinstance(klass, type):
            raise UnsafeFile(f"it creates an instance of {escape(cls.full)}, which is not a class")
        why = _class_problem(klass)
        if why:
            raise UnsafeFile(f"it references {escape(cls.full)} ({why})")
        if issubclass(klass, enum.Enum):
            raise UnsafeFile(f"enum {escape(cls.full)} created without a value")
        if _namedtuple(klass):
            fields = klass._fields
            if not isinstance(args, tuple) or len(args) != len(fields):
                raise UnsafeFile(f"named tuple {escape(cls.full)} with {len(args)} values for {len(fields)} fields")
            return tuple.__new__(klass, tuple(self.store(a) for a in args))
        if args != ():
            raise UnsafeFile(f"it passes arguments to {escape(cls.full)}.__new__")
        inst = object.__new__(klass)
        self.restored[id(inst)] = inst
        return inst

    def build(self, inst: Any, state: Any) -> Any:
        if isinstance(inst, _Partial):
            return self.partial(inst, state)
        if type(inst) is collections.OrderedDict and isinstance(state, dict) and all(isinstance(k, str) for k in state):
            object.__getattribute__(inst, "__dict__").update(state)  # a state dict's _metadata
            return inst
        if id(inst) not in self.restored or self.restored[id(inst)] is not inst:
            raise UnsafeFile(f"it sets the state of a {escape(type(inst).__name__)} it did not create")
        del self.restored[id(inst)]
        slots = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slots = self.store(state[0]), self.store(state[1])
        if state is not None and (not isinstance(state, dict) or not all(isinstance(k, str) for k in state)):
            raise UnsafeFile(f"the state of a {escape(type(inst).__name__)} is not a dict of attributes")
        if isinstance(inst, nn.Module):
            if slots:
                raise UnsafeFile("a module with slot state")
            _restore_module(inst, state or {})
            return inst
        if state:
            try:
                object.__getattribute__(inst, "__dict__").update(state)
            except AttributeError:
                raise UnsafeFile(f"{escape(type(inst).__name__)} has no __dict__ for its state") from None
        if slots:
            if not isinstance(slots, dict):
                raise UnsafeFile("slot state that is not a dict")
            for k, v in slots.items():
                desc = next((c.__dict__[k] for c in type(inst).__mro__ if isinstance(k, str) and k in c.__dict__), None)
                if type(desc) is not types.MemberDescriptorType:
                    raise UnsafeFile(f"slot state names {escape(repr(k))}, which is not a slot")
                desc.__set__(inst, v)
        return inst

    def partial(self, p: _Partial, state: Any) -> Any:
        if not (isinstance(state, tuple) and len(state) == 4):
            raise UnsafeFile("a functools.partial with unusual state")
        func, args, kwds, ns = state
        func = func if func is not None else p.func
        if not isinstance(func, _Global):
            raise UnsafeFile("a functools.partial of something that is not a named class")
        obj = func.obj
        if not (isinstance(obj, type) and issubclass(obj, _norm_classes()) and _storable_callable(obj, func.full)):
            raise UnsafeFile(f"a functools.partial of {escape(func.full)} (only torch.nn norm layers may be stored)")
        args = self.store(args) if args is not None else ()
        kwds = kwds or {}
        if ns:
            raise UnsafeFile("a functools.partial with attributes")
        if not isinstance(args, tuple) or not isinstance(kwds, dict):
            raise UnsafeFile("a functools.partial with unusual arguments")
        for v in list(args) + list(kwds.values()):
            if (
                not isinstance(v, (bool, type(None), float, int))
                or (isinstance(v, int) and not isinstance(v, bool) and not 0 <= v <= LIMITS.partial_int)
                or (isinstance(v, float) and not math.isfinite(v))
            ):
                raise UnsafeFile(f"a functools.partial of {escape(func.full)} with the argument {escape(repr(v))}")
        if not all(isinstance(k, str) and k.isidentifier() for k in kwds):
            raise UnsafeFile("a functools.partial with unusual keyword names")
        return functools.partial(obj, *args, **kwds)


# ----------------------------------------------------------------------------- reviewed calls


def _ints(value: Any, what: str, *, dims: bool = False) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list, torch.Size)) or not all(type(v) is int and v >= 0 for v in value):
        raise UnsafeFile(f"a tensor's {what} is not a list of non-negative integers")
    if dims and len(value) > LIMITS.tensor_dims:
        raise UnsafeFile(f"a tensor with more than {LIMITS.tensor_dims} dimensions")
    return tuple(value)


def _no_hooks(hooks: Any) -> None:
    if hooks is not None and (not isinstance(hooks, dict) or hooks):
        raise UnsafeFile("a tensor carries backward hooks (code the model would call)")


def _tensor(r: _Reader, storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
            hooks: Any = None, metadata: Any = None) -> torch.Tensor:  # fmt: skip
    if not isinstance(storage, _Storage):
        raise UnsafeFile("a tensor rebuilt from something that is not a stored tensor")
    size, stride = _ints(size, "size", dims=True), _ints(stride, "stride", dims=True)
    if type(offset) is not int or offset < 0 or len(size) != len(stride) or not isinstance(requires_grad, bool):
        raise UnsafeFile("a tensor with an unusual layout")
    _no_hooks(hooks)
    if metadata:
        raise UnsafeFile("a tensor with extra metadata")
    numel = math.prod(size)
    if numel and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.numel:
        raise UnsafeFile("a tensor that reaches past the data the file stores for it")
    r.logical(numel * storage.itemsize)
    t = torch.empty(0, dtype=storage.dtype)
    t.set_(storage.untyped, offset, size, stride)
    t.requires_grad_(requires_grad and (t.is_floating_point() or t.is_complex()))
    return t


def _meta_tensor(r: _Reader, dtype: Any, size: Any, stride: Any, requires_grad: Any = False) -> torch.Tensor:
    if not isinstance(dtype, _Global) or not isinstance(dtype.obj, torch.dtype):
        raise UnsafeFile("a meta tensor without a dtype")
    size, stride = _ints(size, "size", dims=True), _ints(stride, "stride", dims=True)
    if len(size) != len(stride) or not isinstance(requires_grad, bool):
        raise UnsafeFile("a meta tensor with an unusual layout")
    r.meta_elements += math.prod(size)
    t = torch.empty_strided(size, stride, dtype=dtype.obj, device="meta")
    t.requires_grad_(requires_grad and (t.is_floating_point() or t.is_complex()))
    return t


def _parameter(r: _Reader, data: Any, requires_grad: Any, hooks: Any = None, state: Any = None) -> nn.Parameter:
    if not isinstance(data, torch.Tensor) or type(data) is not torch.Tensor or not isinstance(requires_grad, bool):
        raise UnsafeFile("a parameter rebuilt from something that is not a plain tensor")
    _no_hooks(hooks)
    p = nn.Parameter(data, requires_grad=requires_grad and (data.is_floating_point() or data.is_complex()))
    _tensor_state(p, state)
    return p


_REBUILDS = (
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_meta_tensor_no_storage",
)


def _from_type(r: _Reader, func: Any, new_type: Any, args: Any, state: Any = None) -> Any:
    """``_rebuild_from_type_v2``: only a reviewed tensor rebuild, only to a tensor type."""
    if not isinstance(func, _Global) or func.full not in _REBUILDS:
        what = func.full if isinstance(func, _Global) else type(func).__name__
        raise UnsafeFile(f"a tensor rebuild that would call {escape(what)}")
    if not isinstance(new_type, _Global) or new_type.obj not in (torch.Tensor, nn.Parameter):
        what = new_type.full if isinstance(new_type, _Global) else type(new_type).__name__
        raise UnsafeFile(f"a tensor rebuilt as {escape(what)}, which is not a tensor type")
    if not isinstance(args, tuple):
        raise UnsafeFile("a tensor rebuild with unusual arguments")
    t = _CALLS[func.full](r, *args)
    if new_type.obj is nn.Parameter:
        t = nn.Parameter(t, requires_grad=t.requires_grad)
    _tensor_state(t, state)
    return t


def _tensor_state(t: torch.Tensor, state: Any) -> None:
    """A tensor's plain attributes (``nn.Buffer`` leaves ``persistent`` and ``_is_buffer``)."""
    if not state:
        return
    if not isinstance(state, dict) or not all(
        isinstance(k, str)
        and k.isidentifier()
        and not k.startswith("__")
        and isinstance(v, (bool, int, float, str, type(None)))
        for k, v in state.items()
    ):
        raise UnsafeFile("a tensor with extra state that is not plain attributes")
    t.__dict__.update(state)


def _ordered_dict(r: _Reader, items: Any = ()) -> collections.OrderedDict:
    out: collections.OrderedDict = collections.OrderedDict()
    for pair in items if isinstance(items, (list, tuple)) else [None]:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise UnsafeFile("an OrderedDict built from something that is not (key, value) pairs")
        out[r.key(pair[0])] = r.store(pair[1])
    return out


def _set(kind: type) -> Callable[..., Any]:
    def make(r: _Reader, items: Any = ()) -> Any:
        if not isinstance(items, (list, tuple)):
            raise UnsafeFile(f"a {kind.__name__} built from a {escape(type(items).__name__)}")
        return kind(r.key(v) for v in items)

    return make


def _size(r: _Reader, dims: Any = ()) -> torch.Size:
    return torch.Size(_ints(dims, "size", dims=True))


def _device(r: _Reader, kind: Any, index: Any = None) -> torch.device:
    if not isinstance(kind, str) or len(kind) > 32 or not (index is None or type(index) is int):
        raise UnsafeFile("a torch.device from something that is not a device name")
    try:
        return torch.device(kind) if index is None else torch.device(kind, index)
    except (RuntimeError, ValueError):
        raise UnsafeFile(f"an unknown device {escape(kind)}") from None


def _encode(r: _Reader, text: Any, encoding: Any = "latin1") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeFile("bytes encoded in an unusual way")
    return text.encode("latin1")


def _bytearray(r: _Reader, data: Any = b"", encoding: Any = None) -> bytearray:
    if isinstance(data, str) and encoding in ("latin1", "latin-1"):
        return bytearray(data.encode("latin1"))
    if isinstance(data, bytes) and encoding is None:
        return bytearray(data)
    raise UnsafeFile("a bytearray from something that is not bytes (a size would allocate it)")


def _slice(r: _Reader, *args: Any) -> slice:
    if len(args) > 3 or not all(a is None or type(a) is int for a in args):
        raise UnsafeFile("a slice of something that is not integers")
    return slice(*args)


def _complex(r: _Reader, re_: Any = 0.0, im: Any = 0.0) -> complex:
    if not all(type(v) in (int, float) for v in (re_, im)):
        raise UnsafeFile("a complex number from something that is not numbers")
    return complex(re_, im)


def _reconstructor(r: _Reader, cls: Any, base: Any, state: Any = None) -> Any:
    if not (isinstance(base, _Global) and base.obj is object) or state is not None or not isinstance(cls, _Global):
        raise UnsafeFile("an object reconstructed from a builtin type")
    return r.instance(cls, ())


def _patched_payload(r: _Reader, payload: Any = None) -> dict[str, Any]:
    """This tool's ``.pt`` names ``rebuild(payload)``: only the payload's layout is checked here;
    ``load`` validates and rebuilds it with its own code."""
    try:
        return patched.payload_only(payload)
    except CBAMInsertError as exc:
        raise UnsafeFile(str(exc), refused=False) from None


_CALLS: dict[str, Callable[..., Any]] = {
    patched.ENTRY_POINT: _patched_payload,
    "torch._utils._rebuild_tensor_v2": _tensor,
    "torch._utils._rebuild_tensor": _tensor,
    "torch._utils._rebuild_meta_tensor_no_storage": _meta_tensor,
    "torch._utils._rebuild_parameter": _parameter,
    "torch._utils._rebuild_parameter_with_state": _parameter,
    "torch._tensor._rebuild_from_type_v2": _from_type,
    "torch._utils._rebuild_from_type_v2": _from_type,
    "collections.OrderedDict": _ordered_dict,
    "builtins.set": _set(set),
    "builtins.frozenset": _set(frozenset),
    "builtins.slice": _slice,
    "builtins.complex": _complex,
    "builtins.bytearray": _bytearray,
    "_codecs.encode": _encode,
    "copyreg._reconstructor": _reconstructor,
    "torch.Size": _size,
    "torch.device": _device,
}


# ----------------------------------------------------------------------------- storages and archives


@dataclass
class _Storage:
    untyped: torch.UntypedStorage
    dtype: torch.dtype
    numel: int
    itemsize: int


class _Archive:
    """The members of a ``torch.save`` zip, read only as far as their real (stored) size allows."""

    def __init__(self, path: Path) -> None:
        try:
            self.zf = zipfile.ZipFile(path)
            infos = self.zf.infolist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise _corrupt(f"a damaged zip archive ({escape(first_line(exc))})") from None
        pkls = [i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
        if len(pkls) != 1:
            raise UnsafeFile("a zip archive without exactly one PyTorch pickle (data.pkl)")
        self.pkl = pkls[0]
        self.prefix = self.pkl.filename[: -len("data.pkl")]
        self.members = {i.filename: i for i in infos}
        self.cache: dict[str, _Storage] = {}
        self.stored = 0
        order = self.members.get(self.prefix + "byteorder")
        if order is not None and self._read(order, 16) not in (b"little", b"little\n"):
            raise UnsafeFile("tensors stored big-endian; re-save the file on this kind of machine")

    def _read(self, info: zipfile.ZipInfo, limit: int) -> bytes:
        if info.file_size > limit:
            raise UnsafeFile(f"{escape(info.filename)} holds {info.file_size} bytes, more than the {limit} allowed")
        try:
            with self.zf.open(info) as fh:
                data = fh.read(limit + 1)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
            raise _corrupt(f"a damaged zip archive ({escape(first_line(exc))})") from None
        if len(data) > limit:
            raise UnsafeFile(f"{escape(info.filename)} unpacks to more than {limit} bytes")
        return data

    def pickle(self) -> bytes:
        return self._read(self.pkl, LIMITS.pickle_bytes)

    def storage(self, pid: tuple[Any, ...]) -> _Storage:
        if len(pid) != 5 or pid[0] != "storage":
            raise UnsafeFile("a persistent id that is not a tensor storage")
        _, dtype, key, location, numel = pid
        if not isinstance(key, str) or not key.isalnum() or not isinstance(location, str) or type(numel) is not int:
            raise UnsafeFile("a storage reference with unusual fields")
        got = self.cache.get(key)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if got is not None:
            if got.dtype != dtype and got.numel * got.itemsize != numel * itemsize:
                raise UnsafeFile(f"storage {escape(key)} referenced with two different sizes")
            return got if got.dtype == dtype else _Storage(got.untyped, dtype, numel, itemsize)
        info = self.members.get(f"{self.prefix}data/{key}")
        if info is None:
            raise UnsafeFile(f"the archive lacks the data of storage {escape(key)}")
        nbytes = numel * itemsize
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != nbytes or info.compress_size != nbytes:
            raise UnsafeFile(f"storage {escape(key)} claims {nbytes} bytes; the archive stores {info.compress_size}")
        buf = torch.empty(nbytes, dtype=torch.uint8)
        try:
            with self.zf.open(info) as fh:
                view = memoryview(buf.numpy()) if nbytes else memoryview(bytearray())
                got_bytes = fh.readinto(view) if nbytes else 0
                while nbytes and got_bytes < nbytes:
                    n = fh.readinto(view[got_bytes:])
                    if not n:
                        break
                    got_bytes += n
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise _corrupt(f"a damaged zip archive ({escape(first_line(exc))})") from None
        if got_bytes != nbytes:
            raise _corrupt(f"storage {escape(key)} is truncated")
        self.stored += nbytes
        st = _Storage(buf.untyped_storage(), dtype, numel, itemsize)
        self.cache[key] = st
        return st


def _scan_names(data: bytes) -> list[tuple[str, str]]:
    """Every name the pickle references, in order, found without running it."""
    names: list[tuple[str, str]] = []
    strings: list[Any] = []  # the last pushed values, for STACK_GLOBAL
    memo: dict[int, Any] = {}
    for ops, (op, arg, _) in enumerate(pickletools.genops(data), 1):
        if ops > LIMITS.opcodes:
            raise UnsafeFile(f"its pickle has more than {LIMITS.opcodes} operations")
        n = op.name
        if n == "GLOBAL":
            mod, _, attr = str(arg).partition(" ")
            names.append(_norm_name(mod, attr))
            strings.append(None)
        elif n == "STACK_GLOBAL":
            if len(strings) < 2 or not all(isinstance(s, str) for s in strings[-2:]):
                raise UnsafeFile("its pickle names a global in a way the safe reader does not follow")
            names.append(_norm_name(strings[-2], strings[-1]))
            strings.append(None)
        elif n in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
            strings.append(arg)
        elif n in ("BINPUT", "PUT", "LONG_BINPUT"):
            memo[int(arg)] = strings[-1] if strings else None
        elif n == "MEMOIZE":
            memo[len(memo)] = strings[-1] if strings else None
        elif n in ("BINGET", "GET", "LONG_BINGET"):
            strings.append(memo.get(int(arg)))
        else:
            strings.append(None)
        if len(strings) > 8:
            del strings[:4]
    return names


def _check_depth(obj: Any, restored_dicts: bool = True) -> None:
    """Refuse results nested deeper than ``LIMITS.depth`` (walking each object once, iteratively)."""
    seen: set[int] = set()
    todo: list[tuple[Any, int]] = [(obj, 1)]
    while todo:
        o, d = todo.pop()
        if d > LIMITS.depth:
            raise UnsafeFile(f"its objects are nested more than {LIMITS.depth} levels deep")
        if isinstance(o, (str, bytes, int, float, torch.Tensor)) or o is None or id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, dict):
            todo.extend((v, d + 1) for v in o.values())
            todo.extend((k, d + 1) for k in o if isinstance(k, tuple))
        elif isinstance(o, (list, tuple, set, frozenset)):
            todo.extend((v, d + 1) for v in o)
        elif isinstance(o, functools.partial):
            todo.extend((v, d + 1) for v in o.args)
        else:
            try:
                space = object.__getattribute__(o, "__dict__")
            except AttributeError:
                continue
            if isinstance(space, dict):
                todo.append((space, d + 1))


@dataclass
class Loaded:
    """What ``read_untrusted`` read: the object and how much tensor data the file really stores."""

    obj: Any
    stored_bytes: int
    meta_elements: int


def read_untrusted(path: Path) -> Loaded:
    """Read a zip ``torch.save`` file under the rules above; raise ``UnsafeFile`` otherwise."""
    archive = _Archive(path)
    data = archive.pickle()
    if data[:1] != b"\x80" or len(data) < 2 or data[1] > 5:
        raise UnsafeFile("its data.pkl is not a pickle this reader knows")
    try:
        names = _scan_names(data)
    except ValueError as exc:
        raise _corrupt(f"its pickle is corrupt or truncated ({escape(first_line(exc))})") from None
    refused = []
    for mod, name in dict.fromkeys(names):
        why = vet_global(mod, name)
        if why:
            refused.append(f"{escape(mod)}.{escape(name)} ({why})")
    if refused:
        raise UnsafeFile(f"refused to load: it references {'; '.join(refused[:8])}"
                         f"{f'; and {len(refused) - 8} more' if len(refused) > 8 else ''}")  # fmt: skip
    reader = _Reader(data, archive.storage, lambda: archive.stored)
    try:
        obj = reader.run()
    except UnsafeFile:
        raise
    except (ValueError, IndexError, KeyError, TypeError, struct.error, RuntimeError, OverflowError,
            AttributeError, MemoryError, RecursionError) as exc:  # fmt: skip
        raise _corrupt(f"its pickle is corrupt or truncated ({escape(first_line(exc))})") from None
    if reader.restored:
        raise UnsafeFile("an object was created but never given its state")
    _check_depth(obj)
    return Loaded(obj, archive.stored, reader.meta_elements)


# ----------------------------------------------------------------------------- legacy (pre-zip) files

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def read_untrusted_legacy(path: Path) -> Loaded:
    """An old-format ``torch.save`` file (``_use_new_zipfile_serialization=False``), same rules."""
    with open(path, "rb") as fh:
        try:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError) as exc:
            raise UnsafeFile(f"cannot map the file ({escape(first_line(exc))})") from None
    with buf:
        return _Legacy(buf).read()


class _Legacy:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0
        self.storages: dict[str, tuple[torch.dtype, int]] = {}
        self.stored = 0
        self.claimed = 0

    def _next_pickle(self, storage: Callable[[tuple[Any, ...]], Any] | None = None) -> Any:
        end = self._pickle_end()
        data = bytes(self.buf[self.pos : end])
        self.pos = end
        names = _scan_names(data)
        if storage is None and names:
            raise UnsafeFile("an old-format header that names code")
        refused = [f"{escape(m)}.{escape(n)} ({w})" for m, n in dict.fromkeys(names) if (w := vet_global(m, n))]
        if refused:
            raise UnsafeFile(f"refused to load: it references {'; '.join(refused[:8])}")

        def no_storage(pid: tuple[Any, ...]) -> Any:
            raise UnsafeFile("a storage in an old-format header")

        reader = _Reader(data, storage or no_storage, lambda: self.claimed)
        reader.module_pids = True
        self.reader = reader
        return reader.run()

    def _pickle_end(self) -> int:
        limit = min(len(self.buf), self.pos + LIMITS.pickle_bytes)
        chunk = self.buf[self.pos : limit]
        for op, _arg, pos in pickletools.genops(chunk):
            if op.name == "STOP":
                return self.pos + pos + 1
        raise _corrupt("a pickle without an end")

    def read(self) -> Loaded:
        try:
            magic = self._next_pickle()
            if magic != _LEGACY_MAGIC:
                raise UnsafeFile("not a torch.save file (wrong magic number)")
            if self._next_pickle() != 1001:
                raise UnsafeFile("an old torch.save format version this reader does not know")
            info = self._next_pickle()
            if not isinstance(info, dict) or info.get("little_endian") is not True:
                raise UnsafeFile("tensors stored big-endian, or an unknown header")
            pending: list[tuple[_Storage, str]] = []

            def storage(pid: tuple[Any, ...]) -> _Storage:
                if len(pid) != 6 or pid[0] != "storage" or pid[5] is not None:
                    raise UnsafeFile("a storage reference this reader does not know (a view of a storage?)")
                _, dtype, key, _location, numel, _view = pid
                if not isinstance(key, str) or not key.isalnum() or type(numel) is not int or numel < 0:
                    raise UnsafeFile("a storage reference with unusual fields")
                if key in self.storages:
                    return self.storages[key]  # type: ignore[return-value]
                itemsize = torch.empty(0, dtype=dtype).element_size()
                self.claimed += numel * itemsize
                if self.claimed > len(self.buf):
                    raise UnsafeFile(f"storage {escape(key)} claims more bytes than the file holds")
                st = _Storage(torch.UntypedStorage(numel * itemsize), dtype, numel, itemsize)
                self.storages[key] = st  # type: ignore[assignment]
                pending.append((st, key))
                return st

            obj = self._next_pickle(storage)
            keys = self._next_pickle()
            if not isinstance(keys, list) or sorted(keys) != sorted(k for _, k in pending):
                raise UnsafeFile("the list of storages does not match the pickle")
            by_key = {k: st for st, k in pending}
            for key in keys:
                st = by_key[key]
                if self.pos + 8 > len(self.buf):
                    raise _corrupt("truncated (a storage's size is missing)")
                (count,) = struct.unpack("<q", self.buf[self.pos : self.pos + 8])
                self.pos += 8
                nbytes = count * st.itemsize
                if count != st.numel or self.pos + nbytes > len(self.buf):
                    raise UnsafeFile(f"storage {escape(key)} claims {nbytes} bytes the file does not hold")
                if nbytes:
                    dst = torch.frombuffer(bytearray(self.buf[self.pos : self.pos + nbytes]), dtype=torch.uint8)
                    torch.empty(0, dtype=torch.uint8).set_(st.untyped).copy_(dst)
                self.pos += nbytes
                self.stored += nbytes
        except UnsafeFile:
            raise
        except (ValueError, IndexError, KeyError, TypeError, struct.error, RuntimeError, OverflowError,
                AttributeError, MemoryError, RecursionError) as exc:  # fmt: skip
            raise _corrupt(f"corrupt or truncated ({escape(first_line(exc))})") from None
        _check_depth(obj)
        return Loaded(obj, self.stored, self.reader.meta_elements)
