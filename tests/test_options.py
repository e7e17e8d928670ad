"""Options declared once on a settings dataclass's fields (options.option): the flags are generated from them, and
the TOML table and FRUITPIPE_* variables read them with no code of their own (issue 36)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

import pytest

from fruitpipe.cli_args import Parser, add_fields, from_args
from fruitpipe.options import option


@dataclass(frozen=True)
class _Demo:
    """A command's settings, as a contributor adds them: one field per option."""

    output: str = option(positional=True, metavar="OUTPUT", help="where")
    foo: int = option(4, help="how many (default %(default)s)")
    rate: float = option(0.5, help="a share")
    kind: str = option("a", choices=("a", "b"), help="which")
    loud: bool = option(False, help="say more")
    table: bool = option(True, flag="--no-table", negate=True, help="skip the table")
    extra: tuple[str, ...] = option((), metavar="X", help="repeatable")
    quiet: bool = False  # filled by the command itself


def _parse(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = Parser(prog="demo")
    add_fields(p, _Demo)
    return p, p.parse_args(argv)


def test_a_field_is_a_flag_with_its_default_type_and_help() -> None:
    p, args = _parse(["out"])
    assert from_args(_Demo, args, quiet=True) == _Demo("out", quiet=True)  # every default is the field's
    _, args = _parse(["out", "--foo", "9", "--rate", "0.25", "--kind", "b", "--loud", "--no-table",
                      "--extra", "x", "--extra", "y"])
    assert from_args(_Demo, args) == _Demo("out", 9, 0.25, "b", True, False, ("x", "y"))
    assert "how many (default 4)" in " ".join(p.format_help().split())
    assert "--quiet" not in p.format_help()  # a field without option() is not a flag


@pytest.mark.parametrize("argv, says", [(["out", "--foo", "many"], "'many' is not a whole number"),
                                        (["out", "--rate", "nan"], "not a finite number"),
                                        (["out", "--kind", "c"], "invalid choice")])
def test_a_bad_value_is_one_line(argv, says, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        _parse(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and says in err


def test_the_toml_table_and_the_environment_read_a_new_field_with_no_code(tmp_path) -> None:
    from fruitpipe.cli_layers import layered_defaults

    toml = tmp_path / "f.toml"
    toml.write_text('[fruitpipe.train]\nfoo = 6\nno_table = true\nextra = ["x"]\n')
    p, _ = _parse(["out"])
    found = layered_defaults(p, "train", str(toml), {"FRUITPIPE_TRAIN_RATE": "0.75"})
    assert found == {"foo": 6, "no_table": True, "extra": ["x"], "rate": 0.75}
    p.set_defaults(**found)
    assert from_args(_Demo, p.parse_args(["out", "--foo", "2"])) == _Demo("out", 2, 0.75, table=False,
                                                                          extra=("x",))


@pytest.mark.parametrize("argv, cls, by_the_command", [
    (["train", "out"], "fruitpipe.classify.settings:TrainSettings", {"storage", "spark_conf", "quiet"}),
    (["serve", "out"], "fruitpipe.serve.settings:ServeSettings", {"storage", "crop"}),
    (["evaluate", "out", "photos"], "fruitpipe.classify.evaluate:EvaluateSettings", {"storage", "crop", "quiet"}),
    (["emr", "plan", "s3://a/in", "s3://b/out"], "fruitpipe.cloud.settings:EmrSettings", {"tags"}),
    (["drift", "ref", "cur"], "fruitpipe.drift.stats:DriftSettings", set()),
    (["sample", "dir"], "fruitpipe.sample:SampleSettings", {"quiet"}),
])
def test_every_setting_of_a_command_is_its_flag_with_the_fields_default(argv, cls, by_the_command) -> None:
    """The flags of `train`, `serve`, `evaluate`, `drift`, `sample` and the `emr` cluster commands are their
    settings' fields: a default changed on the field is the flag's
    default (units included: --decode-mb is in MiB, the field in bytes)."""
    import importlib

    from fruitpipe.cli import build_parser

    module, name = cls.split(":")
    settings = getattr(importlib.import_module(module), name)
    made = from_args(settings, build_parser().parse_args(argv), **{k: None for k in by_the_command})
    for f in fields(settings):
        if f.name not in by_the_command and not f.metadata["flag"].positional:
            assert getattr(made, f.name) == f.default, f.name
    assert {f.name for f in fields(settings) if "flag" not in f.metadata} == by_the_command


def test_the_pipeline_commands_flags_are_configs_fields_merged_below_toml_and_the_environment(tmp_path) -> None:
    """`run`, `embed` and `reduce`: every Config field but those the command fills itself is a flag of the commands
    of its section; the parsed flags hold None until given, so TOML and FRUITPIPE_* decide below them (load_config),
    and the help shows the field's default."""
    from fruitpipe.cli import _flags, build_parser
    from fruitpipe.config import Config, load_config

    by_the_command = {"input", "output", "input_list", "s3_endpoint", "region", "quiet", "spark_conf"}
    flagged = {f.name: f for f in fields(Config) if "flag" in f.metadata}
    assert set(flagged) == {f.name for f in fields(Config)} - by_the_command
    parser = build_parser()
    commands = {a.dest: a for a in parser._actions if isinstance(a, argparse._SubParsersAction)}["command"].choices
    for command, sections in (("run", {"embed", "reduce", "common"}), ("embed", {"embed", "common"}),
                              ("reduce", {"reduce", "common"})):
        dests = {a.dest for a in commands[command]._actions}
        assert {n for n, f in flagged.items() if f.metadata["flag"].section in sections} <= dests, command
        assert not {n for n, f in flagged.items() if f.metadata["flag"].section not in sections} & dests, command
        text = " ".join(commands[command].format_help().split())
        for name, f in flagged.items():
            if f.metadata["flag"].section in sections and f.default not in (None, False):
                assert f"default {f.default}" in text, (command, name)
    args = parser.parse_args(["run", "in", "out"])
    assert all(getattr(args, name) is None for name in flagged)
    made = load_config(_flags(args), env={})
    assert all(getattr(made, name) == f.default for name, f in flagged.items())
    toml = tmp_path / "run.toml"
    toml.write_text("[fruitpipe]\nbatch_size = 8\nk = 5\n")
    merged = load_config(_flags(parser.parse_args(["run", "in", "out", "--variance", "0.9"])), str(toml),
                         env={"FRUITPIPE_BATCH_SIZE": "16"})
    assert (merged.batch_size, merged.variance) == (16, 0.9)  # the environment over the file, a flag over both
