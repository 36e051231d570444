"""The rewrite: insert one CBAM module per used site, rewire the site's users, recompile.

For a ``conv``, ``stage`` or ``module`` site every user of the site's node reads the CBAM output
instead. For a ``block`` site only the merge reads it: CBAM sits on the residual branch, and any
other user of the branch tensor still sees the original. The same splice is applied to the
eval-mode and the train-mode graph of a unit (by node key), so both modes share the modules.

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

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import CBAMInsertError
from .modules import CBAM
from .sites import Site
from .trace import ModeGraphModule, Unit, node_key

__all__ = ["set_submodule", "splice_unit"]


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


def splice_unit(
    unit: Unit, sites: Sequence[Site], make: Callable[[Site], nn.Module], reuse_input: bool = True
) -> tuple[nn.Module, list[str]]:
    """Insert ``make(site)`` after each used site of ``unit``; return the unit's new module and
    the qualified names the CBAM modules got (``_2``, ``_3`` … when a name was taken).
    With ``reuse_input``, modules whose input tensor nothing else reads get ``reuse_input=True``.

    The returned module is a ``GraphModule`` (or a ``ModeGraphModule`` when train and eval
    graphs differ) whose submodules are the unit's own, plus the new CBAM modules.
    """
    root = unit.module
    prefix = f"{unit.path}." if unit.path else ""
    names: list[str] = []
    made: dict[str, nn.Module] = {}
    for site in sites:
        if not site.used or site.unit != unit.path:
            continue
        rel = site.module_name[len(prefix) :]
        name = _free_name(root, rel)
        cbam = make(site)
        set_submodule(root, name, cbam)
        if unit.gm is not root:
            set_submodule(unit.gm, name, cbam)
        names.append(name)
        made[name] = cbam
        placed = 0
        for graph in unit.graphs.values():
            placed += _insert(graph, site, name, type(cbam))
        if not placed:  # pragma: no cover - sites come from these graphs
            raise CBAMInsertError(f"internal: site {site.name} not found in its graph")
    for graph in unit.graphs.values():
        graph.lint()
    if reuse_input:
        calls = [_module_calls(graph, set(made)) for graph in unit.graphs.values()]
        for name, cbam in made.items():
            if isinstance(cbam, CBAM):  # the only module that can write into its input
                cbam.reuse_input = all(_reusable(c.get(name, []), root) for c in calls)
    class_name = type(unit.module).__name__
    if "train" in unit.graphs:
        gm: fx.GraphModule = ModeGraphModule(root, unit.graphs["train"], unit.graphs["eval"], class_name)
    else:
        gm = fx.GraphModule(root, unit.graphs["eval"], class_name)
    _adopt_tree(gm, root)
    gm.train(unit.module.training)
    return gm, [prefix + n for n in names]


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


def _insert(graph: fx.Graph, site: Site, name: str, kind: type = CBAM) -> int:
    by_key: dict[str, fx.Node] = {k: n for n, k in node_key(graph).items()}
    node = by_key.get(site.key)
    if node is None:
        return 0
    anchor = by_key.get(site.operand) if site.operand is not None else node
    if anchor is None:
        return 0
    with graph.inserting_after(anchor):
        new = graph.call_module(name, (anchor,))
    if site.operand is not None:
        node.replace_input_with(anchor, new)
    else:
        anchor.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    new.meta["cbam_key"] = name
    new.meta["cbam_info"] = anchor.meta.get("cbam_info")
    stack = dict(anchor.meta.get("nn_module_stack") or {})
    if anchor.op == "call_module" and stack:
        stack.popitem()
    stack[name] = (name, kind)
    new.meta["nn_module_stack"] = stack
    return 1


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
