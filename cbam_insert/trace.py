"""Tracing policy: which modules are leaves, what a node is called, partial tracing, train/eval.

* ``CBAMTracer`` keeps ``torch.nn`` modules, inserted CBAM modules and torchvision's
  ``FrozenBatchNorm2d`` as leaves, so a norm stays one node and a patched model re-traces
  with its CBAM modules visible.
* ``node_key`` names a node by where it lives in the module tree, not by FX's variable name,
  so the same place has the same name in the train-mode and eval-mode graphs and in a
  freshly built copy of the architecture (the recipe relies on it).
* ``trace_units`` traces the whole model when it can. When it cannot (detection heads,
  data-dependent control flow), it records the inputs of every submodule in one eager run and
  traces the largest submodules that can be traced; the others are reported as skipped.
* FX freezes ``self.training`` at trace time, so each unit is traced in eval and in train mode.
  When the two graphs differ, ``ModeGraphModule`` holds both and switches on ``.train()``.
"""

from __future__ import annotations

import copy
import inspect
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.graph_module import _copy_attr
from torchvision.ops.misc import FrozenBatchNorm2d

from .errors import CBAMInsertError
from .modes import in_mode
from .modules import CBAM

__all__ = [
    "CBAMTracer",
    "ModeGraphModule",
    "TensorInfo",
    "Unit",
    "infer_example_inputs",
    "node_key",
    "propagate",
    "trace_units",
]


FROZEN_NORMS: tuple[type, ...] = (FrozenBatchNorm2d,)
"""Norms outside torch.nn that act on the channel axis (torchvision's detection backbones use them)."""


def _extra_leaf_types() -> tuple[type, ...]:
    from .attention import Attention

    return (CBAM, Attention, *FROZEN_NORMS)


class CBAMTracer(fx.Tracer):
    """``torch.fx.Tracer`` whose leaves are ``torch.nn`` modules, CBAM and frozen batch norms.

    ``leaf_types`` adds further classes that must stay single nodes.
    """

    def __init__(self, leaf_types: Sequence[type] = ()) -> None:
        super().__init__()
        self._leaf_types = _extra_leaf_types() + tuple(leaf_types)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


class ModeGraphModule(fx.GraphModule):
    """A GraphModule with one graph for train mode and one for eval mode.

    ``.train()`` / ``.eval()`` switch the active graph and recompile, so flags FX froze at
    trace time (dropout, auxiliary heads) follow the mode as in the original model. The
    submodules of both graphs are copied from ``root``.
    """

    def __init__(self, root: nn.Module, train_graph: fx.Graph, eval_graph: fx.Graph, class_name: str) -> None:
        super().__init__(root, eval_graph, class_name)
        for node in train_graph.nodes:
            if node.op in ("call_module", "get_attr"):
                _copy_attr(root, self, str(node.target))
        self.train_graph = train_graph
        self.eval_graph = eval_graph
        self.train(root.training)

    def __deepcopy__(self, memo: dict[int, Any]) -> ModeGraphModule:
        # GraphModule's deepcopy re-runs __init__ with the active graph only: restore the other
        # graph and the submodules only it calls from the memo of copied objects
        res = super().__deepcopy__(memo)
        res.__dict__["train_graph"] = memo[id(self.train_graph)]
        res.__dict__["eval_graph"] = memo[id(self.eval_graph)]
        for graph in (self.train_graph, self.eval_graph):
            for node in graph.nodes:
                if node.op in ("call_module", "get_attr"):
                    _copy_missing(self, res, str(node.target), memo)
        res.graph = res.train_graph if res.training else res.eval_graph
        return res

    def train(self, mode: bool = True) -> ModeGraphModule:
        super().train(mode)
        graphs = self.__dict__.get("train_graph"), self.__dict__.get("eval_graph")
        if graphs[0] is not None and graphs[1] is not None:
            graph = graphs[0] if mode else graphs[1]
            if self.graph is not graph:
                self.graph = graph
        return self


def _copy_missing(src: nn.Module, dst: nn.Module, target: str, memo: dict[int, Any]) -> None:
    """Give ``dst`` the deep copy (from ``memo``) of ``src.<target>`` when it lacks it."""
    *parents, leaf = target.split(".")
    for part in parents:
        src = getattr(src, part)
        nxt = getattr(dst, part, None)
        if nxt is None:
            nxt = nn.Module()
            dst.add_module(part, nxt)
        dst = nxt
    if not hasattr(dst, leaf):
        value = getattr(src, leaf)
        copied = memo.get(id(value)) or copy.deepcopy(value, memo)
        if isinstance(copied, torch.Tensor) and not isinstance(copied, nn.Parameter):
            dst.register_buffer(leaf, copied)
        else:
            setattr(dst, leaf, copied)


def _scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    if node.op == "call_module":
        # the innermost entry is the called module itself; the scope is its parent
        entries = [v[0] for v in stack.values()]
        path = entries[-2] if len(entries) > 1 else ""
    return path


def _op_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    if node.op == "call_method":
        return str(node.target).rstrip("_")
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.rstrip("_")


def node_key(graph: fx.Graph) -> dict[fx.Node, str]:
    """Stable names for every node: a module path, or ``scope.op`` for functions and methods.

    A module called more than once gets ``:1``, ``:2`` … for the later calls; the k-th call of
    a function inside one module scope gets the same suffix. Stored in ``node.meta["cbam_key"]``
    and kept there, so a graph that was already spliced keeps its names.
    """
    counts: dict[str, int] = {}
    keys: dict[fx.Node, str] = {}
    for node in graph.nodes:
        if "cbam_key" in node.meta:
            keys[node] = node.meta["cbam_key"]
            counts[keys[node]] = counts.get(keys[node], 0) + 1
            continue
        if node.op in ("placeholder", "output", "get_attr"):
            base = node.name
        elif node.op == "call_module":
            base = str(node.target)
        else:
            scope = _scope(node)
            base = f"{scope}.{_op_name(node)}" if scope else _op_name(node)
        k = counts.get(base, 0)
        counts[base] = k + 1
        key = base if k == 0 else f"{base}:{k}"
        node.meta["cbam_key"] = key
        keys[node] = key
    return keys


@dataclass(frozen=True)
class TensorInfo:
    """Shape, dtype and device of one tensor that flowed through a node."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


class _Propagate(fx.Interpreter):
    """Runs a graph once and stores a ``TensorInfo`` (or a tuple of them) in ``node.meta["cbam_info"]``."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta["cbam_info"] = _info(result)
        return result


def _info(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorInfo(tuple(value.shape), value.dtype, value.device)
    if isinstance(value, (list, tuple)):
        return tuple(_info(v) for v in value)
    return None


def propagate(gm: fx.GraphModule, args: Sequence[Any]) -> None:
    """One run of ``gm`` in eval mode, without gradients, recording tensor metadata.

    The run uses fake tensors (shapes and dtypes only, no arithmetic), so it costs milliseconds
    even for the largest models; graphs that fake tensors cannot run (data-dependent shapes)
    fall back to one real run.
    """
    with in_mode(gm, training=False), torch.no_grad():
        try:
            _fake_run(gm, args)
        except Exception:  # noqa: BLE001 - any failure: do it for real
            _Propagate(gm).run(*args)


def _fake_run(gm: fx.GraphModule, args: Sequence[Any]) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_map

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_args = tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, tuple(args))
    with mode:
        _Propagate(gm).run(*fake_args)


@dataclass
class Unit:
    """One traced part of the model: the whole model (path ``""``) or a submodule.

    ``graphs`` maps ``"eval"`` (always) and ``"train"`` (when it differs) to FX graphs whose
    nodes carry ``cbam_key`` and, after propagation, ``cbam_info``. ``gm`` runs the eval graph.
    """

    path: str
    module: nn.Module
    gm: fx.GraphModule
    graphs: dict[str, fx.Graph]
    args: tuple[Any, ...]

    def full_name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key


@dataclass
class TraceResult:
    units: list[Unit]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module path, reason)


def _with_mode(module: nn.Module, training: bool, fn: Callable[[], Any]) -> Any:
    with in_mode(module, training=training):
        return fn()


def _trace_graphs(module: nn.Module, leaf_types: Sequence[type]) -> dict[str, fx.Graph]:
    if isinstance(module, ModeGraphModule):
        return {"eval": module.eval_graph, "train": module.train_graph}
    if isinstance(module, fx.GraphModule):
        return {"eval": module.graph}
    eval_graph = _with_mode(module, False, lambda: CBAMTracer(leaf_types).trace(module))
    train_graph = _with_mode(module, True, lambda: CBAMTracer(leaf_types).trace(module))
    graphs = {"eval": eval_graph}
    if eval_graph.python_code("self").src != train_graph.python_code("self").src:
        graphs["train"] = train_graph
    for g in graphs.values():
        node_key(g)
    return graphs


def _bind_args(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    if not kwargs:
        return args
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError:
        return args
    bound.apply_defaults()
    return tuple(bound.arguments.values())


def _record_inputs(model: nn.Module, example_inputs: tuple[Any, ...]) -> dict[str, tuple[Any, ...]]:
    recorded: dict[str, tuple[Any, ...]] = {}
    handles = []
    for name, sub in model.named_modules():

        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name) -> None:
            if name not in recorded:
                recorded[name] = _bind_args(mod, args, kwargs)

        handles.append(sub.register_forward_pre_hook(hook, with_kwargs=True))
    restore = _keep_image_size(model, example_inputs)
    try:
        _with_mode(model, False, lambda: _run(model, example_inputs))
    finally:
        for h in handles:
            h.remove()
        restore()
    return recorded


def _keep_image_size(model: nn.Module, example_inputs: tuple[Any, ...]) -> Callable[[], None]:
    """While recording (and counting, ``report.counting_conditions``), stop torchvision's detection
    transform from resizing the example image (to 800 px by default): sites do not depend on the
    size, and the run costs 6x less."""
    first = example_inputs[0] if example_inputs else None
    image = first[0] if isinstance(first, list) and first else first
    if not isinstance(image, torch.Tensor) or image.dim() not in (3, 4):  # [C x H x W, ...] or N x C x H x W
        return lambda: None
    h, w = image.shape[-2:]
    saved = []
    for mod in model.modules():
        if type(mod).__name__ == "GeneralizedRCNNTransform" and getattr(mod, "fixed_size", None) is None:
            saved.append((mod, mod.min_size, mod.max_size))
            mod.min_size, mod.max_size = (int(min(h, w)),), int(max(h, w))

    def restore() -> None:
        for mod, lo, hi in saved:
            mod.min_size, mod.max_size = lo, hi

    return restore


def _run(model: nn.Module, example_inputs: tuple[Any, ...]) -> Any:
    with torch.no_grad():
        return model(*example_inputs)


def _short_reason(exc: BaseException, limit: int = 100) -> str:
    """``"TraceError: Proxy object cannot be iterated"``: the message's first sentence, cut at a
    word boundary when it is longer than ``limit`` characters."""
    lines = str(exc).strip().splitlines()
    first = lines[0].split(". ")[0].strip().rstrip(".") if lines else ""
    if len(first) > limit:
        first = first[:limit].rsplit(" ", 1)[0] + " ..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _make_unit(path: str, module: nn.Module, args: tuple[Any, ...], leaf_types: Sequence[type]) -> Unit:
    graphs = _trace_graphs(module, leaf_types)
    gm = fx.GraphModule(module, graphs["eval"], type(module).__name__)
    for g in graphs.values():
        node_key(g)
    propagate(gm, args)
    return Unit(path, module, gm, graphs, args)


def trace_units(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    leaf_types: Sequence[type] = (),
) -> TraceResult:
    """Trace ``model`` whole, or else its largest traceable submodules (see the module doc)."""
    try:
        return TraceResult([_make_unit("", model, tuple(example_inputs), leaf_types)])
    except CBAMInsertError:
        raise
    except Exception as exc:  # noqa: BLE001 - any trace failure means: go one level down
        root_reason = _short_reason(exc)
    try:
        recorded = _record_inputs(model, tuple(example_inputs))
    except Exception as exc:
        raise CBAMInsertError(
            f"the model does not run on the example inputs ({_short_reason(exc, 240)}); "
            "pass example_inputs / --input-shape that its forward accepts"
        ) from exc
    result = TraceResult([], [("", f"whole model: {root_reason}")])
    for path, child in model.named_children():
        _descend(path, child, recorded, leaf_types, result)
    return result


def _descend(
    path: str,
    module: nn.Module,
    recorded: dict[str, tuple[Any, ...]],
    leaf_types: Sequence[type],
    result: TraceResult,
) -> None:
    if path not in recorded:
        if not any(True for _ in module.children()):
            return
        for name, child in module.named_children():
            _descend(f"{path}.{name}", child, recorded, leaf_types, result)
        return
    is_layer = not any(True for _ in module.children()) and (
        type(module).__module__.startswith("torch.nn") or isinstance(module, _extra_leaf_types())
    )
    if not any(True for _ in module.parameters()):
        if not is_layer:
            result.skipped.append((path, f"{type(module).__name__}: no parameters, left as it is"))
        return
    if is_layer and not isinstance(module, fx.GraphModule):
        result.skipped.append((path, f"{type(module).__name__}: a single layer called by untraced code"))
        return
    try:
        result.units.append(_make_unit(path, module, recorded[path], leaf_types))
        return
    except Exception as exc:  # noqa: BLE001
        reason = _short_reason(exc)
    children = list(module.named_children())
    if not children:
        result.skipped.append((path, f"{type(module).__name__}: {reason}"))
        return
    result.skipped.append((path, f"{type(module).__name__} not traced as a whole ({reason}); its submodules were"))
    for name, child in children:
        _descend(f"{path}.{name}", child, recorded, leaf_types, result)


# ----------------------------------------------------------------------------- example inputs

_DETECTION_NAMES = ("GeneralizedRCNN", "RetinaNet", "FCOS", "SSD")


def infer_example_inputs(model: nn.Module, size: int | None = None) -> tuple[Any, ...]:
    """A sensible example input from the model's first convolution, or an error saying what to pass.

    Conv2d with C input channels -> ``(1, C, 224, 224)``; Conv3d -> ``(1, C, 8, 112, 112)``;
    Conv1d -> ``(1, C, 256)``. torchvision detectors get ``([image],)`` and RAFT two images.
    """
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if first is None:
        raise CBAMInsertError(
            "cannot infer an example input: the model has no convolution; "
            "pass example_inputs (API) or --input-shape (CLI)"
        )
    names = [c.__name__ for c in type(model).__mro__]
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    c = first.in_channels
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen).to(device=device, dtype=dtype)

    if any(n in _DETECTION_NAMES for n in names):
        s = size or 320
        return ([rand(c, s, s)],)
    if "RAFT" in names:
        s = size or 128
        return (rand(1, c, s, s), rand(1, c, s, s))
    required = [
        p
        for p in inspect.signature(model.forward).parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if len(required) > 1:
        raise CBAMInsertError(
            f"cannot infer an example input: {type(model).__name__}.forward takes "
            f"{len(required)} arguments; pass example_inputs (API) or --input-shape (CLI)"
        )
    if isinstance(first, nn.Conv3d):
        return (rand(1, c, 8, size or 112, size or 112),)
    if isinstance(first, nn.Conv1d):
        return (rand(1, c, size or 256),)
    s = size or 224
    return (rand(1, c, s, s),)


def is_add(node: fx.Node) -> bool:
    """True for ``a + b``, ``a += b``, ``torch.add(a, b)`` and ``a.add(b)`` / ``a.add_(b)``."""
    if node.op == "call_function":
        return node.target in (operator.add, operator.iadd, torch.add)
    return node.op == "call_method" and node.target in ("add", "add_")
