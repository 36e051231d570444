"""The public Python API: ``find_sites``, ``insert_attention`` and ``insert_cbam``.

Example::

    >>> import torch, torchvision
    >>> from cbam_insert import insert_cbam, find_sites
    >>> model = torchvision.models.resnet18()
    >>> len([s for s in find_sites(model, after="block") if s.used])
    8
    >>> patched = insert_cbam(model, after="block", init="identity")
    >>> x = torch.randn(1, 3, 224, 224)
    >>> torch.allclose(patched.eval()(x), model.eval()(x), atol=1e-5)
    True
    >>> patched.cbam_report.modules[0]
    'layer1.0.cbam_add'

The report of what was done is attached to the result as ``patched.cbam_report`` (a
``PatchReport``), and the recipe that repeats the patch as ``patched.cbam_recipe`` (a JSON dict;
``cbam_insert.recipe.Recipe.from_json`` reads it as a typed object).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from . import __version__
from .attention import ModuleChoice, check_keeps_shape, choose, is_attention
from .attrs import keep_through_deepcopy
from .errors import CBAMInsertError, escape
from .integrations.transformers import record_recipe
from .meta import meta_copy
from .modules import CBAMConfig
from .options import declared
from .recipe import Recipe, Selection, Step, describe_inputs, make_inputs
from .sites import PLACEMENTS, Site, find_sites_in, select_sites
from .splice import set_submodule, splice_unit
from .trace import TraceResult, infer_example_inputs, trace_units

__all__ = ["CBAM_OPTIONS", "NoSiteError", "PatchReport", "apply_recipe", "find_sites", "insert_attention", "insert_cbam"]

CBAM_OPTIONS = tuple(o.name for o in declared(CBAMConfig))


@dataclass
class PatchReport:
    """What ``insert_cbam`` did: every site found (used or skipped, with the reason), the CBAM
    modules added (qualified names), the traced parts, and the parts that could not be traced."""

    after: str
    sites: list[Site]
    modules: list[str]
    traced: list[str]
    untraced: list[tuple[str, str]] = field(default_factory=list)
    module: str = "cbam"  # the registry name or the user class's import path

    @property
    def used(self) -> list[Site]:
        return [s for s in self.sites if s.used]


def _selection(
    include: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
    stages: tuple[int, int] | Sequence[int] | int | None,
    every: int,
    max_sites: int | None,
    min_channels: int,
) -> Selection:
    def patterns(p: str | Sequence[str] | None) -> tuple[str, ...]:
        if p is None:
            return ()
        return (p,) if isinstance(p, str) else tuple(p)

    if isinstance(stages, int) and not isinstance(stages, bool):
        stages = (stages, stages)
    if stages is not None:
        stages = tuple(stages)  # type: ignore[assignment]
        if len(stages) != 2 or not all(isinstance(s, int) and s >= 1 for s in stages) or stages[0] > stages[1]:  # type: ignore[arg-type]
            raise CBAMInsertError(f"stages must be a range (first, last) of stage numbers >= 1, got {stages!r}")
    if not isinstance(every, int) or every < 1:
        raise CBAMInsertError(f"every must be an integer >= 1, got {every!r}")
    if max_sites is not None and (not isinstance(max_sites, int) or max_sites < 1):
        raise CBAMInsertError(f"max_sites must be an integer >= 1, got {max_sites!r}")
    if not isinstance(min_channels, int) or min_channels < 1:
        raise CBAMInsertError(f"min_channels must be an integer >= 1, got {min_channels!r}")
    return Selection(patterns(include), patterns(exclude), stages, every, max_sites, min_channels)  # type: ignore[arg-type]


def _check_after(after: str) -> None:
    if not isinstance(after, str) or not after.strip():
        raise CBAMInsertError(
            f"after must be one of {', '.join(PLACEMENTS)} or a module name / glob / regex / class name, got {after!r}"
        )


def _inputs(model: nn.Module, example_inputs: Any) -> tuple[Any, ...]:
    if example_inputs is None:
        return infer_example_inputs(model)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, tuple):
        raise CBAMInsertError(
            "example_inputs must be a tuple of positional arguments for forward, e.g. (x,) or ([img],)"
        )
    return example_inputs


def _plan(model: nn.Module, after: str, example_inputs: tuple[Any, ...], sel: Selection) -> tuple[TraceResult, list[Site]]:
    traced = trace_units(model, example_inputs)
    sites = find_sites_in(traced.units, after)
    if after not in PLACEMENTS and not sites:
        raise CBAMInsertError(f"pattern {after!r} matches no module of {type(model).__name__} (try --dry-run with --after conv to list names)")
    for p in sel.include + sel.exclude:
        if not any(_match(p, s.name) for s in sites):
            raise CBAMInsertError(f"pattern {p!r} matches no site (site names look like {sites[0].name!r})" if sites else f"pattern {p!r} matches no site")
    return traced, select_sites(sites, sel)


def _match(pattern: str, name: str) -> bool:
    from .sites import _matcher

    return _matcher(pattern)(name)


def find_sites(
    model: nn.Module,
    after: str = "block",
    example_inputs: Any = None,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    stages: tuple[int, int] | int | None = None,
    every: int = 1,
    max_sites: int | None = None,
    min_channels: int = 1,
) -> list[Site]:
    """Every site of ``model`` for the placement ``after``, used or skipped, with the reason.

    Read-only: the model is traced and run once on ``example_inputs`` (inferred when omitted)
    in eval mode without gradients; nothing in it changes.
    """
    _check_after(after)
    sel = _selection(include, exclude, stages, every, max_sites, min_channels)
    inputs = _inputs(model, example_inputs)
    _, sites = _plan(model, after, inputs, sel)
    return sites


class NoSiteError(CBAMInsertError):
    """No selected site: the message says why; ``sites`` holds every site found (all skipped) and
    ``untraced`` the parts that could not be traced, so a dry run can show them without tracing again."""

    def __init__(self, message: str, sites: list[Site], untraced: list[tuple[str, str]]) -> None:
        super().__init__(message)
        self.sites = sites
        self.untraced = untraced


def _no_site_error(model: nn.Module, after: str, sites: list[Site], traced: TraceResult, sel: Selection) -> NoSiteError:
    units = traced.units
    candidates = [s for s in find_sites_in(units, after) if s.used]
    if candidates:
        return NoSiteError(_kept_none(model, after, candidates, sel), sites, traced.skipped)
    others = []
    for p in PLACEMENTS:
        if p == after:
            continue
        found = find_sites_in(units, p)
        if any(s.used for s in select_sites(found, sel)):
            others.append(p)
    reasons = sorted({s.reason for s in sites})
    more = f" and {len(reasons) - 5} more" if len(reasons) > 5 else ""
    why = f"; skipped: {'; '.join(reasons[:5])}{more}" if reasons else ""
    if others:
        alt = f"; placements that find sites here: {', '.join(others)}"
    elif sel == Selection():
        alt = "; no placement finds a site in this model"
    else:
        alt = "; no other placement finds a site the selection keeps"
    untraced = ""
    if traced.skipped:
        parts = "; ".join(f"{path or '<model>'}: {reason}" for path, reason in traced.skipped[:3])
        more = f" (and {len(traced.skipped) - 3} more)" if len(traced.skipped) > 3 else ""
        untraced = f"; not traced: {parts}{more}"
    return NoSiteError(f"no site for after={after!r} in {type(model).__name__}{why}{alt}{untraced}", sites, traced.skipped)


def _kept_none(model: nn.Module, after: str, candidates: list[Site], sel: Selection) -> str:
    """The placement finds ``candidates`` and the selection keeps none: say what the model has
    and which filters removed them."""
    reasons = [s.reason for s in select_sites(candidates, sel)]
    has, filters = f"the model has {len(candidates)} such site{'s' if len(candidates) > 1 else ''}", []
    stages = sorted({s.stage for s in candidates if s.stage is not None})
    if sel.stages is not None and any(r.startswith("stage ") for r in reasons):
        has += f" in stages {stages[0]}-{stages[-1]}" if len(stages) > 1 else f" in stage {stages[0]}"
        lo, hi = sel.stages
        filters.append(f"stages {lo}" if lo == hi else f"stages {lo}-{hi}")
    if any("< min_channels" in r for r in reasons):
        low, high = min(s.channels for s in candidates), max(s.channels for s in candidates)
        has += f" with {low}-{high} channels" if low != high else f" with {low} channels"
        filters.append(f"min_channels {sel.min_channels}")
    if "not matched by include" in reasons:
        filters.append("include " + ", ".join(repr(p) for p in sel.include))
    if "matched by exclude" in reasons:
        filters.append("exclude " + ", ".join(repr(p) for p in sel.exclude))
    keep = "keeps" if len(filters) == 1 else "keep"
    return (
        f"no site for after={after!r} in {type(model).__name__} kept by the selection: {has}, "
        f"and {' and '.join(filters) or 'the selection'} {keep} none of them"
    )


def insert_cbam(model: nn.Module, after: str = "block", example_inputs: Any = None, **kwargs: Any) -> nn.Module:
    """``insert_attention(model, after, example_inputs, module="cbam", **kwargs)``: CBAM at every
    selected site. The keywords are ``insert_attention``'s; CBAM's options are ``reduction``,
    ``kernel_size``, ``variant``, ``init``, … (declared by ``cbam_insert.modules.CBAMConfig``)."""
    if "module" in kwargs:
        raise CBAMInsertError("insert_cbam inserts CBAM; use insert_attention(model, module=...) for another module")
    return insert_attention(model, after, example_inputs, module="cbam", **kwargs)


def insert_attention(
    model: nn.Module,
    after: str = "block",
    example_inputs: Any = None,
    *,
    module: Any = "cbam",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    stages: tuple[int, int] | int | None = None,
    every: int = 1,
    max_sites: int | None = None,
    min_channels: int = 1,
    inplace: bool = False,
    allow_repatch: bool = False,
    seed: int | None = None,
    reuse_input: bool = True,
    trust: bool = True,
    _sites: Sequence[str] | None = None,
    **module_options: Any,
) -> nn.Module:
    """Return ``model`` with an attention module spliced in at every selected site.

    ``module`` is a name from ``cbam_insert.ATTENTION`` (``"cbam"``, ``"se"``, ``"eca"``,
    ``"coord"``, ``"simam"``, ``"bam"``, ``"gam"``, ``"triplet"``), an import path
    ``"pkg.mod:Class"``, or a class / factory called as ``factory(channels)`` (with ``dims=``
    too when it accepts it); a user module is run once at each site on a map of the site's
    shape and refused unless it keeps that shape. ``module_options`` are the module's declared
    options (``cbam_insert.attention.SEConfig``, …; for a user class, its keyword arguments);
    ``init="identity"`` works for every module. ``trust=False`` refuses to import a user class
    named by a path (``apply_recipe`` of a recipe from a file).

    ``after`` is a placement (``"conv"``, ``"block"``, ``"stage"``) or a module name, glob,
    regex (``re:`` prefix) or class name. The input model is not modified unless
    ``inplace=True``; then untraceable models have their traceable submodules replaced in
    place, and a fully traced model's modules are shared with the result.

    ``reuse_input`` (default on): a CBAM whose input tensor is made fresh by the op before it
    and read by nothing else gets ``reuse_input=True``; in inference it then writes its output
    into that tensor, as ``nn.ReLU(inplace=True)`` does, instead of allocating a new one. A
    forward hook registered later on that op's module sees the tensor after CBAM has scaled it.

    The result carries ``cbam_report`` (a ``PatchReport``) and ``cbam_recipe`` (a dict that
    ``apply_recipe`` replays on a fresh copy of the architecture). Raises ``CBAMInsertError``
    for anything the caller can fix.
    """
    _check_after(after)
    if not isinstance(reuse_input, bool):
        raise CBAMInsertError(f"reuse_input must be True or False, got {reuse_input!r}")
    try:
        choice = choose(module, module_options, trust=trust)  # every option checked here, once
    except ValueError as exc:
        raise CBAMInsertError(str(exc)) from None
    sel = _selection(include, exclude, stages, every, max_sites, min_channels)
    inputs = _inputs(model, example_inputs)
    previous = copy.deepcopy(getattr(model, "cbam_recipe", None))
    base = model.__dict__.get("_cbam_base")
    if base is None:
        base = meta_copy(model, keep_non_persistent=True)
    work = model if inplace else copy.deepcopy(model)
    if _sites is None:
        traced, planned = _plan(work, after, inputs, sel)
    else:  # a replay: the recorded site names decide; no pattern from the recipe is matched
        traced, planned = _plan(work, after if after in PLACEMENTS else _EVERY_MODULE, inputs, Selection())
    sites = [_for_module(s, choice) for s in planned]
    if allow_repatch:
        sites = [_allow(s) for s in sites]
    if _sites is not None:
        sites = _exactly(sites, _sites)
    used = [s for s in sites if s.used]
    if not used:
        refused = sorted({s.reason for s, p in zip(sites, planned) if p.used and not s.used})
        if refused:  # the selection kept sites, but the module does not take their rank
            raise NoSiteError(f"no site for after={after!r} in {type(work).__name__}: {'; '.join(refused)}",
                              sites, traced.skipped)  # fmt: skip
        raise _no_site_error(work, after, sites, traced, sel)
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(seed)

        def make(site: Site) -> nn.Module:
            hidden = choice.options.get("hidden") if isinstance(choice.options, dict) else None
            if isinstance(hidden, int) and hidden > site.channels:
                raise CBAMInsertError(f"hidden={hidden} is wider than the {site.channels} channels at {site.name}")
            dtype = getattr(torch, site.dtype) if site.dtype else None
            try:
                made = choice.build(site.channels, len(site.shape) - 2).to(dtype=dtype)
                if choice.user:
                    check_keeps_shape(made, tuple(site.shape), dtype, site.name)
            except ValueError as exc:
                raise CBAMInsertError(str(exc)) from None
            return made

        result, sites = _splice_all(work, traced, sites, make, reuse_input)
    modules = [s.module_name for s in sites if s.used]
    if not modules:
        raise _no_site_error(work, after, sites, traced, sel)
    report = PatchReport(after, sites, modules, [u.path or "<model>" for u in traced.units], traced.skipped, choice.key)
    step = Step(
        after=after,
        modules=tuple(report.modules),
        example_inputs=describe_inputs(inputs),
        selection=sel,
        options=choice.options,
        module=choice.key,
        allow_repatch=allow_repatch,
        seed=seed,
        reuse_input=reuse_input,
        sites=tuple(s.name for s in sites if s.used),
    )
    try:
        recipe = Recipe.from_json(previous) if previous is not None else Recipe()
    except CBAMInsertError:
        recipe = Recipe()  # not a recipe of ours: this patch starts a new one
    recipe = recipe.then(step, __version__)
    result.cbam_report = report
    result.cbam_recipe = recipe.to_json()
    result.__dict__["_cbam_base"] = base  # not a submodule: kept out of state_dict and .to()
    keep_through_deepcopy(result)
    record_recipe(result)  # a transformers model's config carries it into save_pretrained's config.json
    _match_devices(result)
    return result


_EVERY_MODULE = "re:.*"


def _exactly(sites: list[Site], names: Sequence[str]) -> list[Site]:
    """Keep exactly the sites named (a recipe's record); the error names the first one missing."""
    wanted = set(names)
    out = [s if not s.used or s.name in wanted else replace(s, used=False, reason="not in the recipe") for s in sites]
    missing = [n for n in names if n not in {s.name for s in out if s.used}]
    if missing:
        raise CBAMInsertError(
            f"the recipe does not fit this architecture: site {escape(missing[0])} is not found here; "
            "build the same architecture"
        )
    return out


def _module_key(name: str) -> tuple[str, str]:
    """``layer1.0.se_add_2`` -> ``("layer1.0", "add")``: a module name without its prefix and repeat."""
    parent, _, leaf = name.rpartition(".")
    rest = leaf.split("_", 1)[-1]
    head, _, tail = rest.rpartition("_")
    return parent, head if head and tail.isdigit() else rest


def _recorded_sites(model: nn.Module, step: Step, inputs: tuple[Any, ...]) -> tuple[str, ...] | None:
    """The site names a step with a pattern patched: recorded (``sites``), or for an older recipe
    found from its module names, so that the pattern need not be matched. ``None`` when the step
    uses no pattern: then its placement and numeric filters replay as they are."""
    if step.after in PLACEMENTS and not step.selection.include and not step.selection.exclude:
        return None
    if step.sites:
        return step.sites
    _, sites = _plan(model, step.after if step.after in PLACEMENTS else _EVERY_MODULE, inputs, Selection())
    if step.allow_repatch:
        sites = [_allow(s) for s in sites]
    by_key = {_module_key(s.module_name): s.name for s in sites if s.used}
    names = []
    for m in step.modules:
        if _module_key(m) not in by_key:
            raise CBAMInsertError(
                f"the recipe does not fit this architecture: module {escape(m)} has no site here; build the same architecture"
            )
        names.append(by_key[_module_key(m)])
    return tuple(names)


def _for_module(site: Site, choice: ModuleChoice) -> Site:
    """The site with the module's name prefix (``layer1.0.se_add``), skipped where the module
    does not handle the map's rank or channel count."""
    if choice.prefix != "cbam":
        parent, _, leaf = site.module_name.rpartition(".")
        leaf = choice.prefix + leaf[len("cbam") :] if leaf.startswith("cbam_") else leaf
        site = replace(site, module_name=f"{parent}.{leaf}" if parent else leaf)
    if site.used and site.shape:
        why = choice.refusal(site.shape[1], len(site.shape) - 2)
        if why is not None:
            site = replace(site, used=False, reason=why)
    return site


def _allow(site: Site) -> Site:
    if not site.used and site.reason.startswith("already has "):
        return replace(site, used=True, reason="another attention module (allow_repatch)")
    return site


def _splice_all(
    work: nn.Module, traced: TraceResult, sites: list[Site], make: Any, reuse_input: bool
) -> tuple[nn.Module, list[Site]]:
    """Splice every unit; return the result and the sites with the module names they got
    (``_2``, ``_3`` … after a repatch), a site the splice could not place marked skipped."""
    result = work
    names: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for unit in traced.units:
        if not any(s.used and s.unit == unit.path for s in sites):
            continue
        done = splice_unit(unit, sites, make, reuse_input)
        names.update(done.names)
        skipped.update(done.skipped)
        if unit.path == "":
            result = done.module
        elif done.module is not work.get_submodule(unit.path):
            set_submodule(work, unit.path, done.module)
    out = []
    for s in sites:
        if s.used and s.name in skipped:
            s = replace(s, used=False, reason=skipped[s.name])
        elif s.used:
            s = replace(s, module_name=names[s.name])
        out.append(s)
    return result, out


def _match_devices(model: nn.Module) -> None:
    """Each inserted module takes the device of the parameters around it (not its own or another
    inserted module's)."""
    new = {name for name, mod in model.named_modules() if is_attention(mod)}
    for name in sorted(new):
        mod = model.get_submodule(name)
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        prefix = f"{parent_name}." if parent_name else ""

        def inside_attention(pname: str, prefix: str = prefix) -> bool:
            parts = (prefix + pname).split(".")
            return any(".".join(parts[:i]) in new for i in range(1, len(parts)))

        ref = next((p for n, p in parent.named_parameters() if not inside_attention(n)), None)
        if ref is not None:
            mod.to(device=ref.device)


def apply_recipe(
    model: nn.Module, recipe: dict[str, Any] | Recipe, inplace: bool = False, trust: bool = False
) -> nn.Module:
    """Replay a recipe on a freshly built copy of the architecture it was made on.

    Same recipe and same architecture give the same module names, so a state dict saved from
    the patched model loads into the result. A recipe that does not fit raises an error that
    names the first module that differs. A step that builds a user class (``"module":
    "pkg.mod:Class"``) replays only with ``trust=True``: building the class runs its code.
    Recipes written before other modules existed (``"cbam": {...}``) replay as CBAM.
    """
    parsed = Recipe.from_json(recipe)
    out = model
    for i, step in enumerate(parsed.steps):
        sel = step.selection
        inputs = make_inputs(step.example_inputs)
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        only = _recorded_sites(out, step, inputs)  # patterns from a recipe are never matched
        out = insert_attention(
            out,
            step.after,
            inputs,
            include=sel.include or None,
            exclude=sel.exclude or None,
            stages=sel.stages,
            every=sel.every,
            max_sites=sel.max_sites,
            min_channels=sel.min_channels,
            inplace=inplace or i > 0,
            allow_repatch=step.allow_repatch,
            seed=step.seed,
            reuse_input=step.reuse_input,
            module=step.module,
            trust=trust,
            _sites=only,
            **step.options,
        )
        got = out.cbam_report.modules
        if tuple(got) != step.modules:
            missing = sorted(set(step.modules) - set(got)) or sorted(set(got) - set(step.modules))
            raise CBAMInsertError(
                f"the recipe does not fit this architecture: module {missing[0] if missing else '?'} differs "
                f"({len(got)} attention modules here, {len(step.modules)} in the recipe); build the same architecture"
            )
    out.cbam_recipe = parsed.to_json()
    return out
