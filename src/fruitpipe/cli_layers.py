"""Settings from a TOML file and the environment for every command, the same way `run` reads them (config.py): a
TOML table < FRUITPIPE_* variables < flags. `run`, `embed` and `reduce` use the table [fruitpipe] and
FRUITPIPE_<SETTING>; the other commands [fruitpipe.<command>] and FRUITPIPE_<COMMAND>_<OPTION> (`emr`: one table
and prefix for all its sub-commands), read from the options the parser declares, so a new option is settable
there with no code of its own."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from fruitpipe.config import COMMAND_TABLES, ENV_PREFIX, read_toml
from fruitpipe.errors import ConfigError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
#: Options that no file or variable sets: where the file is, and the logging format chosen before it is read.
_NOT_LAYERED = {"help", "version", "config", "log_format"}


def add_config(p: argparse.ArgumentParser, table: str) -> None:
    """--config for a command whose settings are read from [fruitpipe.<table>]."""
    p.add_argument("--config", metavar="TOML",
                   help=f"read settings from a TOML file (table [fruitpipe.{table}], option names as keys); "
                        f"FRUITPIPE_{table.upper()}_<OPTION> variables override it, flags override both")


def _toml_table(path: str, table: str) -> dict[str, Any]:
    data = read_toml(path)
    found = data.get("fruitpipe", {}).get(table, {}) if isinstance(data.get("fruitpipe"), dict) else {}
    if not isinstance(found, dict):
        raise ConfigError(f"--config {path}: [fruitpipe.{table}] must be a table of settings, not {found!r}")
    return found


def _value(action: argparse.Action, raw: Any, source: str) -> Any:
    """`raw` (a TOML value or a variable's text) as the option's parsed value, or one line saying what is wrong."""
    flag = action.option_strings[-1]
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        text = str(raw).lower()
        if isinstance(raw, bool) or text in _TRUE | _FALSE:
            on = raw if isinstance(raw, bool) else text in _TRUE
            return on if isinstance(action, argparse._StoreTrueAction) else not on
        raise ConfigError(f"{source}: {flag} takes true or false, not {raw!r}")
    if isinstance(action, argparse._AppendAction):
        items = raw if isinstance(raw, list) else [x for x in str(raw).split(",") if x]
        return [_one(action, item, source, flag) for item in items]
    return _one(action, raw, source, flag)


def _one(action: argparse.Action, raw: Any, source: str, flag: str) -> Any:
    text = raw if isinstance(raw, str) else str(raw)
    try:
        value = action.type(text) if callable(action.type) else text
    except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {flag} {text!r}: {exc}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{source}: {flag} {text!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in _NOT_LAYERED}


def layered_defaults(parser: argparse.ArgumentParser, table: str, toml_path: str | None, env: Mapping[str, str],
                     siblings: list[argparse.ArgumentParser] | None = None) -> dict[str, Any]:
    """The defaults the TOML table and the environment give `parser`'s options (the environment winning); flags,
    parsed afterwards, win over both. Positional arguments are never set this way. `siblings`: the parsers that
    share the table (emr's sub-commands): a setting one of them has is not an error for the others."""
    assert table in COMMAND_TABLES, table
    mine = _options(parser)
    options = {k: v for p in (siblings or [parser]) for k, v in _options(p).items()} | mine
    values: dict[str, Any] = {}
    if toml_path:
        found = _toml_table(toml_path, table)
        unknown = sorted(k for k in found if k.replace("-", "_") not in options)
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)} in [fruitpipe.{table}] of {toml_path}; known: "
                              f"{', '.join(sorted(options))}")
        for key, raw in found.items():
            dest = key.replace("-", "_")
            if dest in mine:
                values[dest] = _value(mine[dest], raw, f"{toml_path} [fruitpipe.{table}] {key}")
    prefix = f"{ENV_PREFIX}{table.upper()}_"
    for name, raw in env.items():
        if name.startswith(prefix):
            dest = name[len(prefix):].lower()
            if dest not in options:
                raise ConfigError(f"environment {name}: `fruitpipe {table}` has no option --{dest.replace('_', '-')}; "
                                  f"known: {', '.join(sorted(options))}")
            if dest in mine:
                values[dest] = _value(mine[dest], raw, f"environment {name}")
    return values
