"""Command-line flags generated from a config dataclass: each field is declared once.

A field made with `flag(default, help, group=...)` becomes `--field-name` (type, default and help
from the field), settable as `VLLM_LLMD_ROUTER_FIELD_NAME` too (the flag wins); `--help` lists
the flags by group, each with its default and its variable (`help_text`). The field's type
says how: `bool` is a switch, `int`/`float`/`str` (or `X | None`) take a value, and
`tuple[X, ...]` is repeatable (whitespace-separated in the environment). `config.RouterConfig`
declares the router's flags this way; `config_parse.build_parser` and docs/configuration.md
(scripts/gen_config_reference.py) are generated from `flag_specs`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ENV_PREFIX = "VLLM_LLMD_ROUTER_"
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("", "0", "false", "no", "off")
_VALUE_TYPES: dict[Any, type] = {int: int, float: float, str: str}
_METADATA_KEY = "vllm_llmd.flag"


@dataclass(frozen=True)
class Flag:
    """What a field's flag adds to the field: its help, and where needed a metavar or a name."""

    help: str
    # the section of --help and of the reference that lists it ("serving", "health", ...)
    group: str
    metavar: str | None = None
    # the flag's name when it is not the field's (`pods` is set with the repeatable `--pod`)
    name: str | None = None


def flag(
    default: Any,
    help: str,
    *,
    group: str,
    metavar: str | None = None,
    name: str | None = None,
    secret: bool = False,
) -> Any:
    """A dataclass field that is also a command-line flag (see the module docstring); a
    `secret` one is left out of the config's repr, so a logged config never shows it."""
    meta = Flag(help, group, metavar=metavar, name=name)
    return dataclasses.field(default=default, metadata={_METADATA_KEY: meta}, repr=not secret)


@dataclass(frozen=True)
class FlagSpec:
    """One flag as derived from its field: everything the parser and the reference need."""

    field: str  # the config field it sets
    dest: str  # argparse's name for it (the flag without dashes)
    option: str  # --some-flag
    env: str  # VLLM_LLMD_ROUTER_SOME_FLAG
    value_type: type  # of one value: int, float, str, or bool for a switch
    repeatable: bool
    default: Any  # the field's default
    help: str
    group: str
    metavar: str | None

    @property
    def is_switch(self) -> bool:
        return self.value_type is bool

    @property
    def options(self) -> list[str]:
        """Its command-line forms: a switch on by default is turned off by `--no-NAME`."""
        if self.is_switch and self.default is True:
            return [self.option, "--no-" + self.option[2:]]
        return [self.option]

    @property
    def shown_default(self) -> str:
        """The default as a user would write it ("" when there is none: unset, or empty)."""
        if self.default is None or self.default == () or self.default is False:
            return ""  # a switch is off unless given
        return "on" if self.default is True else str(self.default)

    def help_text(self) -> str:
        """The help of `--help`: the field's, its default and its environment variable."""
        default = f"default: {self.shown_default}; " if self.shown_default else ""
        return f"{self.help} [{default}env: {self.env}]"


def _value_type(annotation: Any, field: str) -> tuple[type, bool]:
    """(type of one value, repeatable) for a field's annotation."""
    repeatable = False
    if typing.get_origin(annotation) is tuple:
        annotation, repeatable = typing.get_args(annotation)[0], True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        not_none = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(not_none) != 1:
            raise TypeError(f"flag field {field}: unsupported union {annotation}")
        annotation = not_none[0]
    if annotation is bool and not repeatable:
        return bool, False
    if repeatable:  # items are parsed by the config (e.g. PodSpec.parse); others are text
        return _VALUE_TYPES.get(annotation, str), True
    if annotation not in _VALUE_TYPES:
        raise TypeError(f"flag field {field}: unsupported type {annotation}")
    return _VALUE_TYPES[annotation], False


def flag_specs(config_class: type) -> list[FlagSpec]:
    """Every flag of a config dataclass, in field order (fields without `flag()` are skipped)."""
    hints = typing.get_type_hints(config_class)
    specs = []
    for f in dataclasses.fields(config_class):
        meta = f.metadata.get(_METADATA_KEY)
        if not isinstance(meta, Flag):
            continue
        dest = meta.name or f.name
        value_type, repeatable = _value_type(hints[f.name], f.name)
        specs.append(
            FlagSpec(
                field=f.name,
                dest=dest,
                option="--" + dest.replace("_", "-"),
                env=ENV_PREFIX + dest.upper(),
                value_type=value_type,
                repeatable=repeatable,
                default=f.default,
                help=meta.help,
                group=meta.group,
                metavar=meta.metavar,
            )
        )
    return specs


def grouped(specs: list[FlagSpec], groups: Sequence[str]) -> list[tuple[str, list[FlagSpec]]]:
    """(group, its specs in field order) in the order of `groups`, which must name every
    spec's group (ValueError: a field in a group that is not listed would not be shown)."""
    unknown = sorted({spec.group for spec in specs} - set(groups))
    if unknown:
        raise ValueError(f"flag groups not in the list of groups: {', '.join(unknown)}")
    by_group = [(group, [spec for spec in specs if spec.group == group]) for group in groups]
    return [(group, members) for group, members in by_group if members]


def _env_default(spec: FlagSpec, text: str) -> Any:
    """The parser default that an environment variable's text sets.

    Raises:
        ValueError: the text is not a value of the flag's type (the message names both).
    """
    if spec.is_switch:
        if text.strip().lower() not in TRUE_WORDS + FALSE_WORDS:
            raise ValueError(
                f"{spec.env}={text!r} is neither on ({'/'.join(TRUE_WORDS)}) nor off "
                f"({'/'.join(FALSE_WORDS)})"
            )
        return text.strip().lower() in TRUE_WORDS
    values = text.split() if spec.repeatable else [text]
    for value in values:
        try:
            spec.value_type(value)
        except ValueError:
            raise ValueError(
                f"{spec.env}={text!r}: {spec.option} takes {spec.value_type.__name__} values, "
                f"and {value!r} is none"
            ) from None
    return values if spec.repeatable else text  # argparse converts it with the flag's type


def unknown_env_vars(specs: list[FlagSpec], environ: Mapping[str, str]) -> list[str]:
    """`VLLM_LLMD_ROUTER_*` variables that are no flag's, each with a "did you mean" when one
    is close (a misspelled variable would otherwise be ignored without a word)."""
    known = [spec.env for spec in specs]
    problems = []
    for name in sorted(n for n in environ if n.startswith(ENV_PREFIX) and n not in known):
        close = difflib.get_close_matches(name, known, n=1)
        problems.append(name + (f" (did you mean {close[0]}?)" if close else ""))
    return problems


def add_flags(
    parser: argparse.ArgumentParser,
    specs: list[FlagSpec],
    environ: Mapping[str, str],
    groups: Sequence[str],
) -> None:
    """Add one argument per spec, in one argument group per flag group (in the order of
    `groups`); a spec's environment variable, if set, is its default."""
    for group, members in grouped(specs, groups):
        section = parser.add_argument_group(group)
        for spec in members:
            try:
                _add_flag(section, spec, environ)
            except ValueError as exc:  # a bad environment variable: a usage error naming it
                parser.error(str(exc))


def _add_flag(
    parser: argparse._ActionsContainer, spec: FlagSpec, environ: Mapping[str, str]
) -> None:
    default = None if spec.repeatable else spec.default
    if spec.env in environ:
        default = _env_default(spec, environ[spec.env])
    help = spec.help_text().replace("%", "%%")  # argparse formats help with %
    if spec.is_switch:
        on_by_default = len(spec.options) > 1
        action = argparse.BooleanOptionalAction if on_by_default else "store_true"
        parser.add_argument(spec.option, action=action, default=default, help=help)
    else:
        parser.add_argument(
            spec.option,
            action="append" if spec.repeatable else "store",
            type=spec.value_type,
            default=default,
            metavar=spec.metavar,
            help=help,
        )


def parsed_values(specs: list[FlagSpec], args: argparse.Namespace) -> dict[str, Any]:
    """{field: parsed value}; a repeatable flag's values as a tuple (empty when not given)."""
    values = {}
    for spec in specs:
        value = getattr(args, spec.dest)
        values[spec.field] = tuple(value or ()) if spec.repeatable else value
    return values
