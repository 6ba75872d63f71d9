"""One config-to-CLI mechanism for every command: click options generated from a frozen config dataclass, and one
YAML/JSON config-file loader. It lives in storage because both stages use it and neither imports the other.

Each `init` field of the dataclass becomes `--field-name`, typed from its annotation, with its help from
`option(default, help)` (the field's metadata) followed by its default. A bool field that defaults to False is a plain flag
(`--no-tail`); one that defaults to True gets `--progress/--no-progress`. Every option defaults to None, meaning
"not given", so that values from `--config FILE` apply and flags override them.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "ConfigFileError",
    "option",
    "config_options",
    "option_fields",
    "settings_from",
    "load_config_file",
    "flag_name",
]

F = TypeVar("F", bound=Callable[..., Any])
S = TypeVar("S", bound="DataclassInstance")


class ConfigFileError(ValueError):
    """A `--config` file is missing, unreadable or not a mapping; the message names the file."""


def flag_name(field_name: str) -> str:
    """`top_k` -> `--top-k`."""
    return "--" + field_name.replace("_", "-")


def option(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field and its CLI help: `top_k: int = option(64, "Tokens stored per position.")`; a required one is
    `option(help=...)`, a mutable default `option(default_factory=dict, help=...)`."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help})


def settings_from(cls: type[S], config: object, **given: Any) -> S:
    """A group of settings (a dataclass such as KDSettings) built once from a config: every field not `given` takes
    the config's attribute of the same name, so the group is passed whole instead of its values one by one."""
    names = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in given]
    return cls(**{name: getattr(config, name) for name in names}, **given)


def option_fields(cls: type, exclude: Iterable[str] = ()) -> list[dataclasses.Field[Any]]:
    """The dataclass fields that become options: init fields not in `exclude`."""
    skip = set(exclude)
    return [f for f in dataclasses.fields(cls) if f.init and f.name not in skip]


def _default_text(f: dataclasses.Field[Any]) -> str:
    if f.default is dataclasses.MISSING:
        return ""
    if f.default is None:
        return ""
    if isinstance(f.default, bool):
        return "" if f.default is False else " [default: on]"
    return f" [default: {f.default}]"


def _base_type(hint: Any) -> Any:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0]
    return hint


def config_options(
    cls: type, *, choices: Mapping[str, Iterable[str]] | None = None, exclude: Iterable[str] = ()
) -> Callable[[F], F]:
    """A decorator adding one click option per field of `cls` (see the module docstring); `choices` restricts
    string fields to the listed values, `exclude` leaves fields to hand-written options (e.g. a dict field)."""
    hints = typing.get_type_hints(cls)
    choices = {k: tuple(v) for k, v in (choices or {}).items()}

    def decorate(func: F) -> F:
        for f in reversed(option_fields(cls, exclude)):
            flag = flag_name(f.name)
            help_text = str(f.metadata.get("help", "")) + _default_text(f)
            base = _base_type(hints[f.name])
            if base is bool:
                if f.default is False:
                    opt = click.option(flag, f.name, is_flag=True, default=None, help=help_text)
                else:
                    opt = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=help_text)
            else:
                kind = click.Choice(choices[f.name]) if f.name in choices else {int: int, float: float, str: str}[base]
                opt = click.option(flag, f.name, type=kind, default=None, help=help_text)
            func = opt(func)
        return func

    return decorate


def load_config_file(path: str | Path, section: str | None = None) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or JSON (.json) mapping of options, keys as field or flag names (`top-k` = `top_k`).

    `section`: when the document holds a mapping under this key (a run's own saved config, e.g. {"train": {...}}),
    that mapping is the options.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigFileError(f"`--config {path}`: no such file")
    text = p.read_text(encoding="utf-8")
    suffix = p.suffix.lower()
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigFileError(f"`--config {path}`: not valid YAML ({e})") from None
    elif suffix == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigFileError(f"`--config {path}`: not valid JSON ({e})") from None
    else:
        raise ConfigFileError(f"`--config {path}`: expected a .yaml, .yml or .json file, got {suffix or 'no suffix'!r}")
    if doc is None:
        doc = {}
    if section is not None and isinstance(doc, dict) and isinstance(doc.get(section), dict):
        doc = doc[section]
    if not isinstance(doc, dict):
        raise ConfigFileError(f"`--config {path}`: expected a mapping of options, got {type(doc).__name__}")
    return {str(k).replace("-", "_"): v for k, v in doc.items()}
