"""One declaration per module option: name, type, default, help text and validation.

Each attention module declares its options once, as a frozen dataclass whose fields are made
with :func:`option`. Everything else derives from that declaration: the module's constructor
(``SE(channels, **options)`` builds ``SEConfig(**options)``), the keywords of
``insert_attention``, the options a recipe records and replays, and the CLI's flags.

Example::

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class ToyConfig(ModuleConfig):
    ...     reduction: int = option(16, "MLP reduction ratio r", check=positive, metavar="R")
    >>> ToyConfig.from_options({"reduction": 8}).reduction
    8
    >>> ToyConfig.from_options({"reduction": 0})
    Traceback (most recent call last):
    ...
    ValueError: reduction must be a positive integer, got 0
    >>> [o.name for o in declared(ToyConfig)]
    ['init', 'reduction']
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = ["INITS", "ModuleConfig", "Option", "declared", "odd", "option", "positive"]

INITS = ("default", "identity")
_KEY = "cbam_insert_option"


@dataclass(frozen=True)
class Option:
    """The declaration of one option, as read from its dataclass field."""

    name: str
    type: Any  # the base type: int, float, str, bool, or tuple (a sequence of str)
    optional: bool  # None is allowed (means "derive it": the paper's adaptive rule, the variant's choice)
    default: Any
    help: str
    check: Callable[[str, Any], None] | None
    choices: tuple[str, ...]
    metavar: str
    example: str = ""  # the CLI help's example value
    aliases: tuple[tuple[str, str], ...] = ()  # old spellings still accepted: (old, new)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def validate(self, value: Any) -> Any:
        """``value`` converted to the declared type (a list becomes a tuple), or ``ValueError``."""
        if value is None and self.optional:
            return None
        what = self.name
        if self.aliases and isinstance(value, str):
            value = dict(self.aliases).get(value, value)
        if self.type is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{what} must be True or False{' or None' if self.optional else ''}, got {value!r}")
        elif self.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{what} must be an integer, got {value!r}")
        elif self.type is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{what} must be a number, got {value!r}")
            value = float(value)
        elif self.type is str:
            if not isinstance(value, str):
                raise ValueError(f"{what} must be a string, got {value!r}")
            if self.choices and value not in self.choices:
                raise ValueError(f"{what} must be one of {', '.join(self.choices)}, got {value!r}")
        elif self.type is tuple:
            if isinstance(value, str) or not isinstance(value, Sequence) or not value:
                raise ValueError(f"{what} must be a non-empty list, got {value!r}")
            value = tuple(value)
            bad = [v for v in value if not isinstance(v, str) or (self.choices and v not in self.choices)]
            if bad:
                raise ValueError(f"{what}: {bad[0]!r} is not one of {', '.join(self.choices)}")
            if len(set(value)) != len(value):
                raise ValueError(f"{what} lists {value!r} with a repeat")
        if self.check is not None:
            self.check(what, value)
        return value

    def from_text(self, text: str) -> Any:
        """The value of a CLI flag's text (only lists arrive as text: comma-separated)."""
        if self.type is tuple:
            return tuple(p.strip() for p in text.split(",") if p.strip())
        return text


def option(
    default: Any,
    help: str,
    *,
    check: Callable[[str, Any], None] | None = None,
    choices: Sequence[str] = (),
    metavar: str = "",
    example: str = "",
    aliases: dict[str, str] | None = None,
) -> Any:
    """A dataclass field that declares one module option (``example``: a value for the CLI help;
    ``aliases``: old spellings of a choice, still accepted)."""
    meta = {_KEY: {"help": help, "check": check, "choices": tuple(choices), "metavar": metavar, "example": example,
                   "aliases": tuple((aliases or {}).items())}}  # fmt: skip
    return field(default=default, metadata=meta)


def positive(name: str, value: Any) -> None:
    if value <= 0:
        raise ValueError(
            f"{name} must be a positive {'integer' if isinstance(value, int) else 'number'}, got {value!r}"
        )


def odd(name: str, value: Any) -> None:
    if value <= 0 or value % 2 == 0:
        raise ValueError(f"{name} must be an odd integer >= 1, got {value!r}")


def _base_type(annotation: Any) -> tuple[Any, bool]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return _base_type(rest[0])[0], True
    origin = typing.get_origin(annotation)
    if origin in (tuple, Sequence) or annotation is tuple:
        return tuple, False
    return annotation, False


def declared(config: type[ModuleConfig]) -> list[Option]:
    """The options ``config`` declares, in declaration order (the shared ``init`` first)."""
    hints = typing.get_type_hints(config)
    out = []
    for f in dataclasses.fields(config):
        meta = f.metadata.get(_KEY)
        if meta is None:
            continue
        typ, optional = _base_type(hints[f.name])
        out.append(
            Option(f.name, typ, optional, f.default, meta["help"], meta["check"], meta["choices"], meta["metavar"],
                   meta["example"], meta["aliases"])
        )
    return out


@dataclass(frozen=True)
class ModuleConfig:
    """Options every module has; a module's own config adds its fields.

    ``init="identity"`` gives the module a learnable scalar gate ``gamma`` initialised to 0:
    it returns ``F + gamma * (A(F) - F)``, exactly F at first, in train and eval mode.
    """

    module: ClassVar[str] = "?"  # the registry name, for messages

    init: str = option(
        "default",
        "default, or identity: a zero-initialised gate makes the patched model compute exactly what the "
        "original did while staying trainable, for pretrained weights",
        choices=INITS,
        metavar="INIT",
        example="identity",
    )

    def __post_init__(self) -> None:
        for opt in declared(type(self)):
            object.__setattr__(self, opt.name, opt.validate(getattr(self, opt.name)))
        self.check()

    def check(self) -> None:
        """Checks across fields (a module's config overrides it)."""

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> ModuleConfig:
        """The config for ``options`` (keyword arguments), or ``ValueError`` naming what is wrong."""
        names = [o.name for o in declared(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ValueError(f"unknown {cls.module} option(s) {', '.join(unknown)}; valid: {', '.join(names)}")
        return cls(**options)

    def given(self) -> dict[str, Any]:
        """The options that differ from their defaults, as JSON values (lists for tuples)."""
        out = {}
        for opt in declared(type(self)):
            value = getattr(self, opt.name)
            if value != opt.default:
                out[opt.name] = list(value) if isinstance(value, tuple) else value
        return out
