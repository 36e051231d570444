"""The rewrite: insert one CBAM module per used site, rewire the site's users, recompile.

For a ``conv``, ``stage`` or ``module`` site every user of the site's node reads the CBAM output
instead. For a ``block`` site only the merge reads it: CBAM sits on the residual branch, and any
other user of the branch tensor still sees the original. The same splice is applied to the
eval-mode and the train-mode graph of a unit (by node key), so both modes share the modules.

New modules are attached inside the module tree at ``Site.module_name`` (``layer1.0.cbam_add``):
every original parameter keeps its state-dict key and the new keys are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def splice_unit(unit: Unit, sites: Sequence[Site], make: Callable[[Site], CBAM]) -> tuple[nn.Module, list[str]]:
    """Insert ``make(site)`` after each used site of ``unit``; return the unit's new module and
    the qualified names the CBAM modules got (``_2``, ``_3`` … when a name was taken).

    The returned module is a ``GraphModule`` (or a ``ModeGraphModule`` when train and eval
    graphs differ) whose submodules are the unit's own, plus the new CBAM modules.
    """
    root = unit.module
    prefix = f"{unit.path}." if unit.path else ""
    names: list[str] = []
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
        placed = 0
        for graph in unit.graphs.values():
            placed += _insert(graph, site, name)
        if not placed:  # pragma: no cover - sites come from these graphs
            raise CBAMInsertError(f"internal: site {site.name} not found in its graph")
    for graph in unit.graphs.values():
        graph.lint()
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


def _insert(graph: fx.Graph, site: Site, name: str) -> int:
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
    stack[name] = (name, CBAM)
    new.meta["nn_module_stack"] = stack
    return 1
