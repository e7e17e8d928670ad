"""The CLI reference (docs/cli.md), generated from the parser itself: every command's `--help`, so the page cannot
drift from the code (tests/test_cli.py compares them). `python -m fruitpipe.cli_reference > docs/cli.md`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

from fruitpipe.cli import build_parser

#: The width the help is wrapped to, whatever terminal generates the page.
WIDTH = 116


def _commands(parser: argparse.ArgumentParser, prefix: str = "fruitpipe") -> Iterator[tuple[str, str]]:
    """(command line, its --help text) of the parser and of every sub-command, depth first, in declaration order."""
    yield prefix, parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, f"{prefix} {name}")


def render() -> str:
    """The whole page, Markdown."""
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH)  # argparse's HelpFormatter reads it
    try:
        commands = list(_commands(build_parser()))
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved
    out = ["# fruitpipe: command-line reference", "",
           "Generated from the parser (`python -m fruitpipe.cli_reference > docs/cli.md`; `make docs` does it):",
           "each command's `--help`, word for word. `tests/test_cli.py` fails when this page and the code differ.",
           "Every command that takes `--config` reads its settings as TOML < environment < flags: `run`, `embed`",
           "and `reduce` from the file's top level and `FRUITPIPE_<NAME>`, the others from the table",
           "`[fruitpipe.<command>]` (one `[fruitpipe.emr]` for every `emr` sub-command) and",
           "`FRUITPIPE_<COMMAND>_<OPTION>`; see the README's settings section.", "", "Commands:", ""]
    out += [f"- [`{line}`](#{line.replace(' ', '-')})" for line, _ in commands[1:]]
    for line, text in commands:
        out += ["", f'<a id="{line.replace(" ", "-")}"></a>', "", f"## `{line}`", "", "```text", text.rstrip(), "```"]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
