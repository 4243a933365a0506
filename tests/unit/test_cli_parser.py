"""The `dynaroute` parser: every flag of every subcommand says what it does and its default."""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys

from dynaroute.cli import HelpFormatter, build_parser

COMMANDS = {"train", "eval", "export", "serve", "infer", "models", "demo"}
_NO_HELP_NEEDED = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """Flags and positionals without help, and flags whose help shows no default. On/off
    switches (store_true) are off unless given; a required flag, or one in a required
    either-or group, has no default to show."""
    problems = []
    formatter = parser._get_formatter()
    required = {id(a) for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions}
    for action in parser._actions:
        if isinstance(action, _NO_HELP_NEEDED):
            continue
        name = "/".join(action.option_strings) or action.dest
        if not action.help:
            problems.append(f"{parser.prog} {name}: no help")
            continue
        shown = formatter._expand_help(action)
        switch = isinstance(action, argparse._StoreTrueAction)
        optional = action.option_strings and not action.required and id(action) not in required
        if optional and not switch and "default" not in shown:
            problems.append(f"{parser.prog} {name}: help shows no default ({shown!r})")
    return problems


def test_every_flag_of_every_subcommand_has_help_and_shows_its_default() -> None:
    parser = build_parser()
    commands = subparsers(parser)
    assert set(commands) == COMMANDS
    problems = undocumented(parser)
    for sub in commands.values():
        problems += undocumented(sub)
        sub.format_help()  # every help string expands (a stray % would raise here)
    assert not problems, "\n".join(problems)


def test_the_walk_finds_a_flag_without_help_or_default() -> None:
    parser = argparse.ArgumentParser(prog="x", formatter_class=HelpFormatter)
    parser.add_argument("--bare", type=int, default=3)
    parser.add_argument("--unset", default=None, help="a file")
    parser.add_argument("--shown", type=int, default=3, help="shows it")
    parser.add_argument("--words", default=None, help="a file (default: none)")
    assert [p.split(":")[0] for p in undocumented(parser)] == ["x --bare", "x --unset"]


def test_defaults_are_shown_in_help() -> None:
    serve = subparsers(build_parser())["serve"].format_help()
    assert "(default: 50051)" in serve and "(default: 1024)" in serve and "(default: text)" in serve
    assert "--log-level" in serve and "--log-format" in serve


def test_version_prints_the_installed_package_version() -> None:
    done = subprocess.run([sys.executable, "-m", "dynaroute", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"dynaroute {importlib.metadata.version('dynaroute')}"


def test_text_training_takes_fractional_epochs_and_tabular_refuses_them_in_one_line(tmp_path) -> None:
    args = build_parser().parse_args(["train", "sst2", "--out", "b", "--epochs", "2.5", "--data", "d"])
    from dynaroute.training.sst2 import config_from_args

    assert config_from_args(args).epochs == 2.5
    done = subprocess.run([sys.executable, "-m", "dynaroute", "train", "digits", "--out", str(tmp_path / "b"),
                           "--epochs", "1.5"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--epochs must be a whole number" in done.stderr
    assert not (tmp_path / "b").exists()
