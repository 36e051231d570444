"""The rewrite: insert one CBAM module per used site, rewire the site's users, recompile.

For a ``conv``, ``stage`` or ``module`` site every user of the site's tensor reads the CBAM output
instead. For a ``block`` site only the merge reads it, on the residual branch: the users of the
branch tensor through which the merge is reached (in train mode that can be a drop-path mask's
multiplication before the merge), while any other reader still sees the original.

Every graph of a unit gets each CBAM: the eval-mode graph and, where ``self.training`` changes
the code (dropout, stochastic depth, auxiliary heads), the train-mode graph. A site is found in
each by its ``Anchor`` (the module call or op that defines it), never by node name, and must have
the same shape there; one that is missing from a graph is skipped with the reason. After the
splice, each CBAM is called exactly once in every graph and its output reaches the graph's output.

What the unit becomes: the whole model becomes an ``fx.GraphModule`` (a ``ModeGraphModule`` when
the modes differ). A traced submodule stays the same object: its forward becomes the rewritten
graphs (``forward.GraphForward``) traced with every module that holds no site kept as a call to
the host's own module, and a site that is the submodule's own output becomes a forward hook
(``forward.OutputCBAM``), so that the host's later edits of those modules still take effect.

New modules are attached inside the module tree at ``Site.module_name`` (``layer1.0.cbam_add``):
every original parameter keeps its state-dict key and the new keys are deterministic.

Input reuse: where the tensor a CBAM reads is made fresh by the op before it (a convolution, a
norm, an addition, possibly through in-place activations) and nothing else reads it, in every
graph of the unit, the module gets ``reuse_input=True`` and in inference writes its output into
that tensor instead of allocating one (``nn.ReLU(inplace=True)`` does the same after a norm).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import CBAMInsertError
from .forward import GraphForward, OutputCBAM
from .modules import CBAM
from .sites import Site
from .trace import ModeGraphModule, TensorInfo, Unit, anchors, mode_graphs, propagate

__all__ = ["Spliced", "set_submodule", "splice_unit"]


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """``root.<name> = module``, creating empty parent modules where the path has none."""
    *parents, leaf = name.split(".")
    owner = root
    for part in parents:
        child = getattr(owner, part, None)
        if not isinstance(child, nn.Module):
            child = nn.Module()
            owner.add_module(part, child)
        owner = child
    owner.add_module(leaf, module)


def _free_name(root: nn.Module, name: str) -> str:
    existing = dict(root.named_modules())
    if name not in existing:
        return name
    k = 2
    while f"{name}_{k}" in existing:
        k += 1
    return f"{name}_{k}"


@dataclass
class Spliced:
    """What ``splice_unit`` did: the unit's module afterwards, the qualified CBAM name of each
    placed site (by site name) and, for sites it could not place, the reason."""

    module: nn.Module
    names: dict[str, str]
    skipped: dict[str, str]


def splice_unit(unit: Unit, sites: Sequence[Site], make: Callable[[Site], nn.Module], reuse_input: bool = True) -> Spliced:
    """Insert ``make(site)`` after each used site of ``unit`` (see the module doc).
    With ``reuse_input``, modules whose input tensor nothing else reads get ``reuse_input=True``."""
    root = unit.module
    prefix = f"{unit.path}." if unit.path else ""
    partial = unit.path != ""
    mine = [s for s in sites if s.used and s.unit == unit.path]
    # a container's own forward would call a new child: a Sequential root gets a rewritten forward
    hooked = {s.name for s in mine if partial and s.output and s.operand_anchor is None and not isinstance(root, _CONTAINERS)}
    in_graph = [s for s in mine if s.name not in hooked]
    graphs = _final_graphs(unit, in_graph) if in_graph else {}
    spots: dict[str, dict[str, tuple[fx.Node, fx.Node | None]]] = {}
    skipped: dict[str, str] = {}
    index = {mode: {anc.key: n for n, anc in anchors(g).items()} for mode, g in graphs.items()}
    for site in in_graph:
        found = {}
        for mode in graphs:
            spot, why = _locate(index[mode], site)
            if spot is None:
                skipped[site.name] = f"not found in the {mode}-mode graph ({why})"
                break
            found[mode] = spot
        else:
            spots[site.name] = found
    names: dict[str, str] = {}
    made: dict[str, nn.Module] = {}
    for site in mine:
        if site.name in skipped:
            continue
        name = _free_name(root, _home(root, site.module_name[len(prefix) :]) if partial else site.module_name[len(prefix) :])
        cbam = make(site)
        set_submodule(root, name, cbam)
        names[site.name] = prefix + name
        if site.name in hooked:
            root.register_forward_hook(OutputCBAM(name))
            continue
        made[name] = cbam
        for mode, (node, merge) in spots[site.name].items():
            _insert(graphs[mode], node, merge, name, type(cbam))
    for mode, graph in graphs.items():
        graph.lint()
        _check_calls(graph, set(made), mode)
    if reuse_input:
        calls = [_module_calls(graph, set(made)) for graph in graphs.values()]
        for name, cbam in made.items():
            if isinstance(cbam, CBAM):  # the only module that can write into its input
                cbam.reuse_input = all(_reusable(c.get(name, []), root) for c in calls)
    if not graphs:
        return Spliced(root, names, skipped)
    if partial:
        root.__dict__["forward"] = GraphForward.from_graphs(root, graphs)
        return Spliced(root, names, skipped)
    class_name = type(unit.module).__name__
    if "train" in graphs:
        gm: fx.GraphModule = ModeGraphModule(root, graphs["train"], graphs["eval"], class_name)
    else:
        gm = fx.GraphModule(root, graphs["eval"], class_name)
    _adopt_tree(gm, root)
    gm.train(unit.module.training)
    return Spliced(gm, names, skipped)


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _home(root: nn.Module, name: str) -> str:
    """Where a new module goes in a traced part: not inside a container (``nn.Sequential``,
    ``nn.ModuleList``), which the host's code may call or iterate as it is (ultralytics' C2f
    runs ``for m in self.m``): ``layer2.0.downsample.cbam_0`` -> ``layer2.0.cbam_downsample_0``."""
    parent, _, leaf = name.rpartition(".")
    parts = parent.split(".") if parent else []
    k = len(parts)
    while k > 0 and isinstance(root.get_submodule(".".join(parts[:k])), _CONTAINERS):
        k -= 1
    if k == len(parts):
        return name
    rest = "_".join(parts[k:])
    tail = leaf.removeprefix("cbam_")
    new = f"cbam_{rest}_{tail}" if tail else f"cbam_{rest}"
    return ".".join([*parts[:k], new])


def _final_graphs(unit: Unit, sites: Sequence[Site]) -> dict[str, fx.Graph]:
    """The graphs the splice rewrites, with tensor metadata in each mode.

    The whole model: the graph the sites were found on and its train-mode twin. A submodule:
    traced again with only the modules that hold a site traced through (the others stay calls);
    when that trace fails or disagrees with the first one about the output, the full trace."""
    root = unit.module
    if unit.path == "":
        graphs = mode_graphs(root, unit.leaf_types, eval_graph=None if isinstance(root, fx.GraphModule) else unit.graphs["eval"])
    else:
        inside = {p for s in sites for anc in (s.anchor, s.operand_anchor) if anc is not None for p in anc.inside}
        try:
            graphs = mode_graphs(root, unit.leaf_types, inside)
        except Exception:  # noqa: BLE001 - the full trace worked: use it
            graphs = mode_graphs(root, unit.leaf_types)
        if _output_info(graphs["eval"], root, unit.args) != _output_info(unit.graphs["eval"]):
            graphs = mode_graphs(root, unit.leaf_types)
    for mode, graph in graphs.items():
        if not (mode == "eval" and graph is unit.graphs["eval"]):
            propagate(fx.GraphModule(root, graph), unit.args, training=mode == "train")
        graph.owning_module = None  # call_module checks targets on it: the CBAMs go on ``root``
    return graphs


def _output_info(graph: fx.Graph, root: nn.Module | None = None, args: Sequence[object] = ()) -> object:
    if root is not None:
        propagate(fx.GraphModule(root, graph), args)
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    value = out.args[0]
    return value.meta.get("cbam_info") if isinstance(value, fx.Node) else None


def _locate(index: dict[tuple[object, ...], fx.Node], site: Site) -> tuple[tuple[fx.Node, fx.Node | None] | None, str]:
    """The node to refine and, for a block site, its merge; or None and why not."""
    if site.anchor is None:
        return None, "no anchor"
    node = index.get(site.anchor.key)
    if node is None:
        return None, f"no {site.anchor.describe()}"
    merge = None
    if site.operand_anchor is not None:
        merge, node = node, index.get(site.operand_anchor.key)
        if node is None:
            return None, f"no {site.operand_anchor.describe()}"
        if not _reaches(node, merge):
            return None, f"{site.operand_anchor.describe()} does not feed the merge"
    info = node.meta.get("cbam_info")
    if not isinstance(info, TensorInfo):
        # found by its anchor, but shape propagation stopped before it in this mode (Inception-v3's
        # train-mode aux head fails on a batch of one): the site's shape stands
        return (node, merge), ""
    if tuple(info.shape) != tuple(site.shape):
        return None, f"shape {list(info.shape)} there, {list(site.shape)} here"
    return (node, merge), ""


def _reaches(src: fx.Node, dst: fx.Node) -> bool:
    return src in _ancestors(dst, src)


def _ancestors(node: fx.Node, stop: fx.Node) -> set[fx.Node]:
    """Nodes from which ``node`` is reachable, not walking above ``stop`` (graph order)."""
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    floor = order[stop]
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        for p in n.all_input_nodes:
            if p not in seen and order[p] >= floor:
                seen.add(p)
                todo.append(p)
    return seen


def _insert(graph: fx.Graph, node: fx.Node, merge: fx.Node | None, name: str, kind: type = CBAM) -> None:
    with graph.inserting_after(node):
        new = graph.call_module(name, (node,))
    if merge is None:
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    else:
        feeds = _ancestors(merge, node) | {merge}
        for user in list(node.users):
            if user is not new and user in feeds:
                user.replace_input_with(node, new)
    new.meta["cbam_info"] = node.meta.get("cbam_info")
    stack = dict(node.meta.get("nn_module_stack") or {})
    if node.op == "call_module" and stack:
        stack.popitem()
    stack[name] = (name, kind)
    new.meta["nn_module_stack"] = stack
    new.meta["cbam_returns"] = [name]
    new.meta["cbam_key"] = name


def _check_calls(graph: fx.Graph, names: set[str], mode: str) -> None:
    """Each CBAM in ``names`` is called once in ``graph`` and its output reaches the output."""
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    live = _ancestors(out, next(iter(graph.nodes)))
    calls = _module_calls(graph, names)
    for name in sorted(names):
        got = calls.get(name, [])
        if len(got) != 1 or got[0] not in live:
            raise CBAMInsertError(f"internal: {name} is called {len(got)} time(s) in the {mode}-mode graph, or its output is unused")


def _adopt_tree(gm: fx.GraphModule, root: nn.Module) -> None:
    """Give ``gm`` the root's own children, parameters, buffers and plain attributes, in the root's order.

    GraphModule copies only what its graph calls, into plain ``nn.Module`` containers; taking
    the original subtrees keeps containers indexable (``model.layer1[0]``) and keeps every
    original state-dict key, even of modules the graph does not call.
    """
    for key, value in root.__dict__.items():
        # plain attributes the caller's code may read (RAFT reads update_block.hidden_state_size)
        if not key.startswith("_") and key not in gm.__dict__ and not hasattr(type(gm), key):
            gm.__dict__[key] = value
    gm._modules.clear()
    for name, child in root.named_children():
        gm._modules[name] = child
    for name, param in root._parameters.items():
        if param is not None:
            gm._parameters[name] = param
    for name, buf in root._buffers.items():
        if buf is not None:
            gm._buffers[name] = buf
            if name in root._non_persistent_buffers_set:
                gm._non_persistent_buffers_set.add(name)
    for name in gm._buffers:
        if name not in root._buffers:  # a constant the tracer lifted out of forward (_tensor_constant0)
            gm._non_persistent_buffers_set.add(name)


# module classes whose forward returns a new tensor (their own forward, not a subclass's)
_FRESH_MODULES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
    nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm, nn.Linear,
)  # fmt: skip
# activations: a new tensor, or with ``inplace=True`` their input, modified
_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.ELU, nn.CELU, nn.SELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid,
)  # fmt: skip
# modules that may return their input object itself (Dropout in eval mode, Identity)
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_FRESH_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.cat,
    torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d, F.batch_norm, F.layer_norm,
    F.group_norm, F.instance_norm, F.linear,
}  # fmt: skip
_FRESH_METHODS = {"add", "sub", "mul", "div"}
_INPLACE_METHODS = {"add_", "sub_", "mul_", "div_", "relu_", "clamp_", "clamp_min_", "sigmoid_", "hardtanh_"}


def _known_forward(module: nn.Module, classes: tuple[type, ...]) -> bool:
    """``module`` is one of ``classes`` running that class's own forward, with no hooks."""
    return (
        any(isinstance(module, c) and type(module).forward is c.forward for c in classes)
        and not module._forward_hooks
        and not module._forward_pre_hooks
    )


def _module_calls(graph: fx.Graph, names: set[str]) -> dict[str, list[fx.Node]]:
    """The ``call_module`` nodes of ``graph`` calling one of ``names``, by name (one walk)."""
    calls: dict[str, list[fx.Node]] = {}
    for n in graph.nodes:
        if n.op == "call_module" and n.target in names:
            calls.setdefault(str(n.target), []).append(n)
    return calls


def _reusable(nodes: list[fx.Node], root: nn.Module) -> bool:
    """Whether the CBAM calls ``nodes`` (of one graph) may write into their input tensor: each is
    the only reader of a tensor made fresh by the op before it. True when there are none."""
    return all(len(n.args) == 1 and not n.kwargs and _fresh_only_reader(n.args[0], n, root) for n in nodes)


def _fresh_only_reader(value: object, reader: fx.Node, root: nn.Module, depth: int = 0) -> bool:
    """``reader`` is the only user of ``value``, a tensor no other node can reach."""
    if not isinstance(value, fx.Node) or set(value.users) != {reader} or depth > 16:
        return False
    if value.op == "call_module":
        try:
            module = root.get_submodule(str(value.target))
        except AttributeError:
            return False
        if _known_forward(module, _FRESH_MODULES):
            return True
        if _known_forward(module, _ACTIVATIONS):
            return not getattr(module, "inplace", False) or _through(value, root, depth)
        if _known_forward(module, _PASS_THROUGH):
            return _through(value, root, depth)
        return False
    if value.op == "call_function":
        if value.target in _FRESH_FUNCTIONS:
            return "out" not in value.kwargs and any(isinstance(a, fx.Node) for a in value.args)
        if value.target in (F.relu, F.relu6, F.silu, F.hardswish, F.leaky_relu, F.elu):
            inplace = value.kwargs.get("inplace", value.args[-1] if len(value.args) > 1 else False)
            if inplace is False:
                return True
            return inplace is True and _through(value, root, depth)
        if value.target in (torch.relu, torch.sigmoid):
            return True
        if value.target in (torch.relu_, F.relu_) or _is_stochastic_depth(value.target):
            return _through(value, root, depth)
        return False
    if value.op == "call_method":
        if value.target in _FRESH_METHODS:
            return "out" not in value.kwargs
        if value.target in _INPLACE_METHODS:
            return _through(value, root, depth)
    return False


def _through(node: fx.Node, root: nn.Module, depth: int) -> bool:
    """``node`` returns its first argument: that tensor must satisfy the same rule."""
    return bool(node.args) and _fresh_only_reader(node.args[0], node, root, depth + 1)


def _is_stochastic_depth(target: object) -> bool:
    """torchvision's ``stochastic_depth`` (the end of EfficientNet's and ConvNeXt's residual
    branches): its input itself in eval mode, a new tensor in training."""
    try:
        from torchvision.ops import stochastic_depth
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return False
    return target is stochastic_depth
