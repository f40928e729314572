"""`pymvm CMD ...` builds only CMD's parser (issue 15), and parses and answers exactly as the
whole parser does."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from pymvm import cli

ARGVS = [
    ["run", "vm.toml"],
    ["--log-level", "warning", "run", "--no-seccomp", "--api-sock", "s", "vm.toml"],
    ["--log-level=debug", "run", "--backend-user", "", "vm.toml"],
    ["status", "sock", "--json"],
    ["pause", "sock"],
    ["net", "sock", "net0", "--link", "down"],
    ["exec", "sock", "--timeout", "3", "--", "true"],
    ["cleanup"],
    ["validate", "vm.toml"],
    ["build-kernel", "-j", "2", "--acpi"],
    ["build-kernel", "-j", "2", "--nested-host"],
    ["build-initramfs", "--with", "iperf3", "--modules"],
    ["build-rootfs", "-o", "x.ext4", "--size-mib", "64"],
    ["vhost-user", "net", "--socket", "s", "--tap", "t", "--client"],
    ["vhost-user", "blk", "--socket", "s", "--image", "i", "--read-only"],
]


def outcome(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[object, str, str]:
    """(namespace or exit status, stdout, stderr) of parse_args."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result: object = vars(parser.parse_args(argv))
        except SystemExit as e:
            result = e.code
    return result, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("argv", ARGVS, ids=lambda a: " ".join(a))
def test_the_one_subcommand_parser_parses_as_the_whole_parser(argv: list[str]) -> None:
    only = cli.command_named(argv)
    assert only == next(a for a in argv if not a.startswith("-") and a not in cli.LOG_LEVELS)
    parser = cli.build_parser(only=only)
    assert parser.only.built
    assert outcome(parser, argv) == outcome(cli.build_parser(), argv)


@pytest.mark.parametrize("argv", [["run", "--help"], ["run"], ["run", "vm.toml", "--bogus"],
                                  ["vhost-user", "blk", "--help"], ["exec", "--help"]],
                         ids=lambda a: " ".join(a))
def test_help_and_errors_of_a_subcommand_are_those_of_the_whole_parser(argv: list[str]) -> None:
    fast = outcome(cli.build_parser(only=cli.command_named(argv)), argv)
    assert fast[0] in (0, 2) and (fast[1] or fast[2])
    assert fast == outcome(cli.build_parser(), argv)


@pytest.mark.parametrize("argv", [["--help"], ["--log-level", "loud", "run", "x"], ["--log", "info", "run", "x"], []])
def test_top_level_help_and_options_other_than_log_level_use_the_whole_parser(argv) -> None:
    assert cli.command_named(argv) is None


def test_an_unknown_command_is_refused_by_the_whole_parser_listing_every_command(capsys) -> None:
    assert cli.command_named(["runn", "x"]) == "runn"
    with pytest.raises(SystemExit) as e:
        cli.main(["runn", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'runn'" in err and "build-kernel" in err and "vhost-user" in err
