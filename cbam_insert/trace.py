"""Tracing policy: which modules are leaves, what a node is called, partial tracing, train/eval.

* ``CBAMTracer`` keeps ``torch.nn`` modules, inserted CBAM modules and torchvision's
  ``FrozenBatchNorm2d`` as leaves, so a norm stays one node and a patched model re-traces
  with its CBAM modules visible.
* ``node_key`` names a node by where it lives in the module tree, not by FX's variable name,
  so a site has a stable, readable name in a freshly built copy of the architecture (the
  recipe relies on it). ``anchors`` says what defines each node (the module call whose result
  it is, or the op, shape and position within its module call): that, not a name, is how a site
  found on the eval-mode graph is found again in the train-mode graph and in a re-trace.
* ``trace_units`` traces the whole model when it can. A submodule whose forward does not trace
  becomes an opaque leaf (its whole class), reported, and the trace is tried again. When the
  model's own forward does not trace (detection heads, data-dependent control flow), it records
  the inputs of every submodule in one eager run and traces the largest submodules that can be
  traced, in the order they run; the others are reported as skipped.
* FX freezes ``self.training`` at trace time, so each unit is traced in eval and in train mode
  (``mode_graphs``). For the whole model, ``ModeGraphModule`` holds both and switches on
  ``.train()``; a traced submodule gets both as its rewritten forward (``forward.GraphForward``).
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import operator
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.graph_module import _copy_attr
from torchvision.ops.misc import FrozenBatchNorm2d

from .errors import CBAMInsertError
from .forward import graph_forward, output_hooks
from .modes import in_mode
from .modules import CBAM

__all__ = [
    "Anchor",
    "CBAMTracer",
    "ModeGraphModule",
    "TensorInfo",
    "Unit",
    "anchors",
    "infer_example_inputs",
    "mode_graphs",
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

    ``leaf_types`` adds further classes that must stay single nodes (opaque parts that do not
    trace). ``inside``, when given, turns the policy around: every submodule whose path is not
    in it is a leaf, so the graph calls the host's own modules wherever nothing inside them
    changes (a host that later edits such a module, like ultralytics ``fuse()``, still works).

    Each node a module call returns gets the call's key (``layer1.0.relu@1`` for the second
    call) in ``node.meta["cbam_returns"]``; ``anchors`` uses it to name a site by what defines
    it. A failure inside a submodule's forward carries that module's path and class as the
    exception's ``cbam_failed`` attribute. The root's own rewritten forward and output hooks
    (``forward.GraphForward``, ``forward.OutputCBAM``) are traced as they run.
    """

    def __init__(self, leaf_types: Sequence[type] = (), inside: Collection[str] | None = None) -> None:
        super().__init__()
        self._leaf_types = _extra_leaf_types() + tuple(leaf_types)
        self._inside = None if inside is None else set(inside)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._leaf_types):
            return True
        if self._inside is not None and module_qualified_name not in self._inside:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        path = self.path_of_module(m)
        k = self.num_calls.get(path, 0)
        key = f"{path}@{k}" if k else path
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            if not hasattr(exc, "cbam_failed"):
                exc.cbam_failed = (path, type(m))  # type: ignore[attr-defined]
            raise
        if isinstance(out, fx.Proxy):
            out.node.meta.setdefault("cbam_returns", []).append(key)
        return out

    def trace(self, root: nn.Module | Callable[..., Any], concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        fwd = graph_forward(root) if isinstance(root, nn.Module) else None
        if fwd is None:
            graph = super().trace(root, concrete_args)
        else:
            cls = type(root)
            assert isinstance(root, nn.Module)
            root.__class__ = type(cls.__name__, (cls,), {"forward": fwd.function(root.training), "__module__": cls.__module__})
            try:
                graph = super().trace(root, concrete_args)
            finally:
                root.__class__ = cls
        if isinstance(root, nn.Module):
            _append_output_hooks(graph, output_hooks(root))
        return graph


def _append_output_hooks(graph: fx.Graph, names: Sequence[str]) -> None:
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    value = out.args[0]
    if not names or not isinstance(value, fx.Node):
        return
    for name in names:
        with graph.inserting_before(out):
            value = graph.call_module(name, (value,))
        value.meta["nn_module_stack"] = {name: (name, CBAM)}
        value.meta["cbam_returns"] = [name]
    out.args = (value,)


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


def propagate(gm: fx.GraphModule, args: Sequence[Any], training: bool = False) -> bool:
    """One run of ``gm`` in eval (or train) mode, without gradients, recording tensor metadata.

    The run uses fake tensors for the inputs and for every parameter and buffer (shapes and
    dtypes only, no arithmetic), so it costs milliseconds even for the largest models and a
    train-mode run changes no running statistics and draws no random numbers. A graph that fake
    tensors cannot run (data-dependent shapes) gets one real run in eval mode; in train mode it
    is left without metadata. Returns whether the nodes got their metadata.
    """

    def run() -> bool:
        with torch.no_grad():
            try:
                _fake_run(gm, args)
            except Exception:  # noqa: BLE001 - any failure: do it for real
                if training:
                    return False
                _Propagate(gm).run(*args)
        return True

    return bool(_with_mode(gm, training, run))


def _fake_run(gm: fx.GraphModule, args: Sequence[Any]) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.utils.stateless import _reparametrize_module
    from torch.utils._pytree import tree_map

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_args = tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, tuple(args))
    state = {name: mode.from_tensor(t) for name, t in [*gm.named_parameters(), *gm.named_buffers()]}
    # an op that fails on fake tensors is run for real next; torch logs its traceback first
    log = logging.getLogger("torch._subclasses.fake_tensor")
    was_disabled, log.disabled = log.disabled, True
    try:
        with _reparametrize_module(gm, state), mode:
            _Propagate(gm).run(*fake_args)
    finally:
        log.disabled = was_disabled


@dataclass(frozen=True)
class Anchor:
    """What defines a node, the same in every trace of one module (train or eval mode, with more
    or fewer leaves): the module call whose result it is (``call``: ``layer1.0.bn3``,
    ``layer1.0.relu@1`` for a module's second call), or else the op within its module call
    (``scope``, ``op``) and its output ``shape``, counted among the same op and shape in that
    scope (``index``). ``inside`` lists the module paths a tracer must trace through to see it.
    Node names are not used: the same name can denote another node in another trace (a
    drop-connect mask's ``add`` before the residual ``add``)."""

    call: str
    scope: str = ""
    op: str = ""
    shape: tuple[int, ...] | None = None
    index: int = 0
    inside: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.call,) if self.call else ("", self.scope, self.op, self.shape, self.index)

    def describe(self) -> str:
        if self.call:
            return f"the output of {self.call}"
        where = self.scope or "the traced module"
        return f"{self.op} #{self.index + 1} of shape {list(self.shape or ())} in {where}"


def anchors(graph: fx.Graph) -> dict[fx.Node, Anchor]:
    """The ``Anchor`` of every node that computes something (placeholders and outputs excluded)."""
    counts: dict[tuple[Any, ...], int] = {}
    out: dict[fx.Node, Anchor] = {}
    for n in graph.nodes:
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        stack = list((n.meta.get("nn_module_stack") or {}).items())
        returns = set(n.meta.get("cbam_returns", ()))
        paths = [path for _, (path, _) in stack]
        outer = next((i for i, (key, _) in enumerate(stack) if key in returns), None)
        if outer is not None:
            out[n] = Anchor(call=stack[outer][0], inside=tuple(paths[:outer]))
            continue
        scope = stack[-1][0] if stack else ""
        info = n.meta.get("cbam_info")
        shape = info.shape if isinstance(info, TensorInfo) else None
        op = _op_name(n)
        k = counts.get((scope, op, shape), 0)
        counts[(scope, op, shape)] = k + 1
        out[n] = Anchor("", scope, op, shape, k, tuple(paths))
    return out


@dataclass
class Unit:
    """One traced part of the model: the whole model (path ``""``) or a submodule.

    ``graphs`` maps ``"eval"`` to the FX graph the sites are found on (every module traced
    through but the leaves), its nodes carrying ``cbam_key`` and ``cbam_info``. ``gm`` runs it.
    ``leaf_types`` are the classes kept opaque because they do not trace. ``returned_by`` is
    the outermost module (maybe untraced) that returns this unit's output, or its own path.
    """

    path: str
    module: nn.Module
    gm: fx.GraphModule
    graphs: dict[str, fx.Graph]
    args: tuple[Any, ...]
    leaf_types: tuple[type, ...] = ()
    returned_by: str = ""  # the outermost module whose output is this unit's output

    def full_name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path and key else key or self.path


@dataclass
class TraceResult:
    units: list[Unit]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module path, reason)
    opaque: list[type] = field(default_factory=list)  # classes kept as leaves because they do not trace


def _with_mode(module: nn.Module, training: bool, fn: Callable[[], Any]) -> Any:
    try:
        with in_mode(module, training=training):
            return fn()
    finally:
        if isinstance(module, ModeGraphModule):  # its active graph follows the restored flag
            module.train(module.training)


def mode_graphs(
    module: nn.Module, leaf_types: Sequence[type] = (), inside: Collection[str] | None = None, eval_graph: fx.Graph | None = None
) -> dict[str, fx.Graph]:
    """The graphs of ``module`` in eval mode and, when it differs, in train mode (see ``CBAMTracer``
    for ``leaf_types`` and ``inside``). A GraphModule made by a previous patch gives its own graphs."""
    if isinstance(module, ModeGraphModule):
        return {"eval": module.eval_graph, "train": module.train_graph}
    if isinstance(module, fx.GraphModule):
        return {"eval": module.graph}
    if eval_graph is None:
        eval_graph = _with_mode(module, False, lambda: CBAMTracer(leaf_types, inside).trace(module))
    train_graph = _with_mode(module, True, lambda: CBAMTracer(leaf_types, inside).trace(module))
    graphs = {"eval": eval_graph}
    if eval_graph.python_code("self").src != train_graph.python_code("self").src:
        graphs["train"] = train_graph
    for g in graphs.values():
        node_key(g)
    return graphs


def _eval_graph(module: nn.Module, leaf_types: Sequence[type]) -> fx.Graph:
    if isinstance(module, ModeGraphModule):
        graph = module.eval_graph
    elif isinstance(module, fx.GraphModule):
        graph = module.graph
    else:
        graph = _with_mode(module, False, lambda: CBAMTracer(leaf_types).trace(module))
    node_key(graph)
    return graph


def _bind_args(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    if not kwargs:
        return args
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError:
        return args
    bound.apply_defaults()
    return tuple(bound.arguments.values())


def _record_inputs(model: nn.Module, example_inputs: tuple[Any, ...]) -> tuple[dict[str, tuple[Any, ...]], dict[str, str]]:
    """One eager run: the arguments of each module's first call, in the order the calls begin,
    and for each module the outermost module whose first call returned the same tensor (an
    untraced ``C2f`` returns its ``cv2``'s output: ``model.2.cv2`` -> ``model.2``)."""
    recorded: dict[str, tuple[Any, ...]] = {}
    outputs: dict[str, Any] = {}
    handles = []
    for name, sub in model.named_modules():

        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name) -> None:
            if name not in recorded:
                recorded[name] = _bind_args(mod, args, kwargs)

        def out_hook(mod: nn.Module, args: tuple[Any, ...], output: Any, name: str = name) -> None:
            outputs.setdefault(name, output)

        handles.append(sub.register_forward_pre_hook(hook, with_kwargs=True))
        handles.append(sub.register_forward_hook(out_hook))
    restore = _keep_image_size(model, example_inputs)
    try:
        _with_mode(model, False, lambda: _run(model, example_inputs))
    finally:
        for h in handles:
            h.remove()
        restore()
    outer: dict[str, str] = {}
    for name, value in outputs.items():
        best = name
        parts = name.split(".")
        for k in range(len(parts) - 1, 0, -1):
            parent = ".".join(parts[:k])
            if outputs.get(parent) is value and isinstance(value, torch.Tensor):
                best = parent
        outer[name] = best
    return recorded, outer


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


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


_MAX_OPAQUE = 24  # classes made opaque before a module counts as untraceable


def _make_unit(
    path: str, module: nn.Module, args: tuple[Any, ...], leaf_types: Sequence[type], result: TraceResult
) -> Unit:
    """Trace ``module``; a submodule whose forward does not trace becomes an opaque leaf (all of
    its class, for every later unit too), recorded once in ``result.skipped``, and the trace is
    tried again."""
    while True:
        try:
            graph = _eval_graph(module, (*leaf_types, *result.opaque))
            break
        except CBAMInsertError:
            raise
        except Exception as exc:
            failed = getattr(exc, "cbam_failed", None)
            if failed is None or failed[1] in result.opaque or len(result.opaque) >= _MAX_OPAQUE:
                raise
            result.opaque.append(failed[1])
            where = f"{path}.{failed[0]}" if path else failed[0]
            result.skipped.append((where, f"{failed[1].__name__} does not trace; kept opaque (a leaf), as every module of its class: {_short_reason(exc)}"))
    gm = fx.GraphModule(module, graph, type(module).__name__)
    propagate(gm, args)
    return Unit(path, module, gm, {"eval": graph}, args, tuple(result.opaque))


def trace_units(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    leaf_types: Sequence[type] = (),
) -> TraceResult:
    """Trace ``model`` whole, or else its largest traceable submodules (see the module doc)."""
    result = TraceResult([])
    try:
        result.units.append(_make_unit("", model, tuple(example_inputs), leaf_types, result))
        if not result.opaque:
            return result
        root_reason = None
    except CBAMInsertError:
        raise
    except Exception as exc:  # noqa: BLE001 - any trace failure means: go one level down
        root_reason = _short_reason(exc)
    try:
        recorded, outer = _record_inputs(model, tuple(example_inputs))
    except Exception as exc:
        raise CBAMInsertError(
            f"the model does not run on the example inputs ({_short_reason(exc, 240)}); "
            "pass example_inputs / --input-shape that its forward accepts"
        ) from exc
    if root_reason is not None:
        result = TraceResult([], [("", f"whole model: {root_reason}")] + result.skipped, result.opaque)
        for path, child in model.named_children():
            _descend(path, child, recorded, leaf_types, result)
    _descend_opaque(recorded, leaf_types, result)
    first_call = {path: i for i, path in enumerate(recorded)}
    result.units.sort(key=lambda u: first_call.get(u.path, len(first_call)))  # the order they run in
    for u in result.units:
        u.returned_by = outer.get(u.path, u.path)
    return result


def _descend_opaque(recorded: dict[str, tuple[Any, ...]], leaf_types: Sequence[type], result: TraceResult) -> None:
    """The submodules of an opaque leaf get traced as parts of their own (SSDLite's heads do not
    trace, the convs in them do); the unit holding the leaf calls it as it is."""
    done: set[str] = set()
    k = 0
    while k < len(result.units):
        unit = result.units[k]
        k += 1
        if not result.opaque:
            continue
        for name, sub in unit.module.named_modules():
            path = unit.full_name(name)
            if not name or path in done or not isinstance(sub, tuple(result.opaque)):
                continue
            if any(path.startswith(d + ".") for d in done):
                continue
            done.add(path)
            for child_name, child in sub.named_children():
                _descend(f"{path}.{child_name}", child, recorded, leaf_types, result)


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
        result.units.append(_make_unit(path, module, recorded[path], leaf_types, result))
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
MAX_INFERRED_ELEMENTS = 1 << 24
"""An inferred example input has at most this many elements (64 MiB of float32): 334 channels at 224x224."""


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
        if math.prod(shape) > MAX_INFERRED_ELEMENTS:  # in_channels comes from the model, maybe a crafted file
            raise CBAMInsertError(
                f"cannot infer an example input: {type(first).__name__} has {c} input channels, so the usual "
                f"input would be {'x'.join(map(str, shape))}; pass example_inputs (API) or --input-shape (CLI)"
            )
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
