"""The recipe: everything needed to repeat a patch on a freshly built copy of the same architecture.

A recipe is plain JSON (``patched.cbam_recipe`` holds it as a dict). Here it is a typed object:
``Recipe.from_json`` validates a dict that came from anywhere (a file, a user) and raises
``CBAMInsertError`` with one line when it is malformed; ``Recipe.to_json`` writes it back.
``api`` builds one step per ``insert_cbam`` call, ``load`` validates the recipes it finds in files,
and ``cli`` reads the example input of the last step.

Example::

    >>> r = Recipe.from_json({"format": "cbam-insert/recipe", "version": 1, "steps": [
    ...     {"after": "block", "modules": ["layer1.0.cbam_add"],
    ...      "example_inputs": {"tuple": [{"shape": [1, 3, 64, 64], "dtype": "float32"}]}}]})
    >>> r.steps[0].after, r.steps[0].selection.every, r.steps[0].reuse_input
    ('block', 1, True)
    >>> Recipe.from_json(r.to_json()) == r
    True
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import CBAMInsertError

__all__ = ["FORMAT", "MAX_EXAMPLE_ELEMENTS", "MAX_STEPS", "Recipe", "Selection", "Step", "describe_inputs", "make_inputs"]

FORMAT = "cbam-insert/recipe"
VERSION = 1
MAX_STEPS = 16
"""A recipe replays at most this many steps (each one traces and patches the model)."""
MAX_EXAMPLE_ELEMENTS = 1 << 24
"""Elements a recipe's example inputs may ask for in all (they are allocated to replay the patch:
2^24 is 64 MiB of float32; a detector replayed on a 2^28-element input used 13 GB)."""
MAX_TEXT = 256
"""Characters of a placement, pattern or module name in a recipe."""
MAX_KERNEL = 15
"""The largest spatial kernel a recipe may ask for (odd sizes 1..15)."""
MAX_WIDTH = 1 << 16
"""The largest MLP width (``hidden``) or ``reduction`` a recipe may ask for; ``hidden`` must also
not exceed the channels of the site it is used at."""
_MAX_NESTING = 8


def _bad(what: str) -> CBAMInsertError:
    return CBAMInsertError(f"its recipe is malformed ({what})")


def _int(value: Any, what: str, low: int = 0, high: int = 1 << 31, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad(f"{what} must be an integer in [{low}, {high}]")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT or not value.isprintable():
        raise _bad(f"{what} must be a printable string of 1 to {MAX_TEXT} characters")
    return value


def _pattern(value: Any, what: str) -> str:
    """A placement or pattern: its regular expression (``re:``) must compile; replay never matches it."""
    text = _text(value, what)
    if text.startswith("re:"):
        try:
            re.compile(text[3:])
        except (re.error, RecursionError, OverflowError) as exc:
            raise _bad(f"{what} is not a regular expression ({exc})") from None
    return text


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (_text(value, what),)
    if not isinstance(value, (list, tuple)) or len(value) > 1 << 16:
        raise _bad(f"{what} must be a list of strings")
    return tuple(_text(v, what) for v in value)


_OPTION_BOUNDS = {"reduction": (1, MAX_WIDTH), "hidden": (1, MAX_WIDTH), "kernel_size": (1, MAX_KERNEL)}


def _options(value: Any, where: str, key: str) -> dict[str, Any]:
    """A step's module options, each a plain value of bounded size (the module checks the rest)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and k.isidentifier() for k in value):
        raise _bad(f"{where}: {key!r} must be an object of options")
    for name, v in value.items():
        if name in _OPTION_BOUNDS:
            low, high = _OPTION_BOUNDS[name]
            if not (name == "hidden" and v is None):
                _int(v, f"{where}: {key}.{name}", low, high)
            if name == "kernel_size" and v % 2 == 0:
                raise _bad(f"{where}: {key}.{name} must be odd")
        elif isinstance(v, list):
            if len(v) > 8 or not all(isinstance(x, (str, int, float)) and not isinstance(x, bool)
                                     and (not isinstance(x, str) or len(x) <= 32)
                                     and (not isinstance(x, int) or abs(x) <= MAX_WIDTH) for x in v):  # fmt: skip
                raise _bad(f"{where}: {key}.{name} must be a short list of names or numbers")
        elif not (v is None or isinstance(v, (bool, float)) or (isinstance(v, str) and len(v) <= 32)
                  or (isinstance(v, int) and abs(v) <= MAX_WIDTH)):  # fmt: skip
            raise _bad(f"{where}: {key}.{name} must be a number, a flag or a short name")
    return dict(value)


@dataclass(frozen=True)
class Selection:
    """Filters that keep some sites (applied by ``cbam_insert.sites.select_sites``), as the recipe
    records them. Patterns are globs or regexes (``re:`` prefix forces regex)."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    stages: tuple[int, int] | None = None
    every: int = 1
    max_sites: int | None = None
    min_channels: int = 1

    @classmethod
    def from_json(cls, d: Any) -> Selection:
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise _bad("selection must be an object")
        stages = d.get("stages")
        if stages is not None:
            if not isinstance(stages, (list, tuple)) or len(stages) != 2:
                raise _bad("selection.stages must be [first, last]")
            stages = (_int(stages[0], "a stage", 1, 64), _int(stages[1], "a stage", 1, 64))
        return cls(
            include=tuple(_pattern(p, "selection.include") for p in _strings(d.get("include"), "selection.include")),
            exclude=tuple(_pattern(p, "selection.exclude") for p in _strings(d.get("exclude"), "selection.exclude")),
            stages=stages,  # type: ignore[arg-type]
            every=_int(d.get("every", 1), "selection.every", 1),  # type: ignore[arg-type]
            max_sites=_int(d.get("max_sites"), "selection.max_sites", 0, optional=True),
            min_channels=_int(d.get("min_channels", 1), "selection.min_channels", 1),  # type: ignore[arg-type]
        )

    def to_json(self) -> dict[str, Any]:
        return {"include": list(self.include), "exclude": list(self.exclude),
                "stages": list(self.stages) if self.stages else None, "every": self.every,
                "max_sites": self.max_sites, "min_channels": self.min_channels}  # fmt: skip


@dataclass(frozen=True)
class Step:
    """One ``insert_attention`` call: placement, selection, the attention module (a registry name or
    a user class's import path) and its options, and the module names it made."""

    after: str
    modules: tuple[str, ...]
    example_inputs: Any
    selection: Selection = field(default_factory=Selection)
    options: dict[str, Any] = field(default_factory=dict)
    module: str = "cbam"
    allow_repatch: bool = False
    seed: int | None = None
    reuse_input: bool = True
    sites: tuple[str, ...] = ()
    """The names of the sites the step patched, in order: a step with a pattern replays exactly
    these, so no pattern from a file is ever matched against a model's names (``()`` in older recipes)."""

    @classmethod
    def from_json(cls, d: Any, index: int = 0) -> Step:
        if not isinstance(d, dict):
            raise _bad(f"step {index + 1} is not an object")
        after = d.get("after")
        if not isinstance(after, str) or not after:
            raise _bad(f"step {index + 1}: 'after' must be a placement or a module pattern")
        _pattern(after, f"step {index + 1}: 'after'")
        modules = d.get("modules")
        if not isinstance(modules, list):
            raise _bad(f"step {index + 1}: 'modules' must be a list of module names")
        modules = _strings(modules, f"step {index + 1}: a module name")
        sites = _strings(d.get("sites", ()), f"step {index + 1}: a site name")
        if sites and len(sites) != len(modules):
            raise _bad(f"step {index + 1}: 'sites' and 'modules' differ in length")
        key = "options" if "options" in d else "cbam"  # "cbam": recipes written before other modules
        options = _options(d.get(key, {}), f"step {index + 1}", key)
        module = d.get("module", "cbam")
        if not isinstance(module, str) or not module or len(module) > 256:
            raise _bad(f"step {index + 1}: 'module' must be a module name or pkg.mod:Class")
        example = d.get("example_inputs")
        size = input_elements(example)
        if size is None:
            raise _bad(f"step {index + 1}: 'example_inputs' is not an input description")
        if size > MAX_EXAMPLE_ELEMENTS:
            raise CBAMInsertError(f"its recipe asks for example inputs too large to replay (step {index + 1})")
        reuse = d.get("reuse_input", d.get("reuse_inputs", True))  # "reuse_inputs": the name before the rename
        for name, value in (("allow_repatch", d.get("allow_repatch", False)), ("reuse_input", reuse)):
            if not isinstance(value, bool):
                raise _bad(f"step {index + 1}: {name!r} must be true or false")
        return cls(
            after=after,
            modules=modules,
            example_inputs=example,
            selection=Selection.from_json(d.get("selection")),
            options=dict(options),
            module=module,
            allow_repatch=d.get("allow_repatch", False),
            seed=_int(d.get("seed"), f"step {index + 1}: seed", 0, (1 << 63) - 1, optional=True),
            reuse_input=reuse,
            sites=sites,
        )

    def to_json(self) -> dict[str, Any]:
        return {"after": self.after, "selection": self.selection.to_json(), "module": self.module,
                "options": dict(self.options),
                "allow_repatch": self.allow_repatch, "seed": self.seed, "reuse_input": self.reuse_input,
                "example_inputs": self.example_inputs, "modules": list(self.modules),
                **({"sites": list(self.sites)} if self.sites else {})}  # fmt: skip


@dataclass(frozen=True)
class Recipe:
    """A sequence of patch steps, in the order they were applied."""

    steps: tuple[Step, ...] = ()
    version: int = VERSION
    cbam_insert: str = ""

    @classmethod
    def from_json(cls, d: Any) -> Recipe:
        if isinstance(d, Recipe):
            return d
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise CBAMInsertError(f"not a cbam-insert recipe (expected a JSON object with format {FORMAT!r})")
        version = d.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= VERSION:
            raise CBAMInsertError(f"its recipe has version {version!r}; this cbam-insert reads {VERSION}")
        steps = d.get("steps")
        if not isinstance(steps, list):
            raise _bad("'steps' must be a list")
        if len(steps) > MAX_STEPS:
            raise CBAMInsertError(f"its recipe has {len(steps)} steps; at most {MAX_STEPS} are replayed")
        made_by = d.get("cbam_insert", "")
        return cls(tuple(Step.from_json(s, i) for i, s in enumerate(steps)), version, made_by if isinstance(made_by, str) else "")

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": self.version, "cbam_insert": self.cbam_insert,
                "steps": [s.to_json() for s in self.steps]}  # fmt: skip

    def then(self, step: Step, made_by: str) -> Recipe:
        """This recipe with one more step."""
        return Recipe(self.steps + (step,), self.version, made_by)

    @property
    def example_inputs(self) -> Any:
        """The last step's example input description (what exports capture on by default)."""
        return self.steps[-1].example_inputs if self.steps else None


# ----------------------------------------------------------------------------- example inputs


def describe_inputs(inputs: Any) -> Any:
    """A JSON description (shapes and dtypes) of example inputs, for the recipe."""
    if isinstance(inputs, torch.Tensor):
        return {"shape": list(inputs.shape), "dtype": str(inputs.dtype).removeprefix("torch.")}
    if isinstance(inputs, (list, tuple)):
        return {"tuple" if isinstance(inputs, tuple) else "list": [describe_inputs(x) for x in inputs]}
    raise CBAMInsertError(f"example inputs must be tensors or lists/tuples of tensors, got {type(inputs).__name__}")


def input_elements(spec: Any, depth: int = 0) -> int | None:
    """Elements in a ``describe_inputs`` description, or ``None`` when it is not one."""
    if depth > _MAX_NESTING or not isinstance(spec, dict) or len(spec) not in (1, 2):
        return None
    if "shape" in spec:
        shape, dtype = spec["shape"], spec.get("dtype")
        ok = isinstance(shape, list) and len(shape) <= 8 and all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_EXAMPLE_ELEMENTS for d in shape)  # fmt: skip
        return math.prod(shape) if ok and isinstance(dtype, str) and _dtype(dtype) is not None else None
    items = spec.get("list", spec.get("tuple"))
    if len(spec) != 1 or not isinstance(items, list) or len(items) > 64:
        return None
    sizes = [input_elements(s, depth + 1) for s in items]
    return None if None in sizes else sum(sizes)  # type: ignore[arg-type]


def _dtype(name: str) -> torch.dtype | None:
    dtype = getattr(torch, name, None) if name.isidentifier() else None
    return dtype if isinstance(dtype, torch.dtype) and (dtype.is_floating_point or dtype in (torch.int64, torch.int32, torch.bool)) else None


def make_inputs(spec: Any, device: str | torch.device | None = None) -> Any:
    """Random tensors (seeded, uniform in [0, 1), not the global RNG) matching a ``describe_inputs`` description."""
    if input_elements(spec) is None:
        raise _bad("'example_inputs' is not an input description")
    gen = torch.Generator().manual_seed(0)

    def build(s: dict[str, Any]) -> Any:
        if "shape" in s:
            return torch.rand(*s["shape"], generator=gen).to(dtype=_dtype(s["dtype"]), device=device)
        if "list" in s:
            return [build(x) for x in s["list"]]
        return tuple(build(x) for x in s["tuple"])

    return build(spec)
