"""`pymvm run CONFIG` is read without argparse (issue 15), exactly as argparse reads it; every
other command line goes to argparse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pymvm import cli

REPO = Path(__file__).resolve().parents[2]

READ_WITHOUT_ARGPARSE = [
    ["run", "vm.toml"],
    ["--log-level", "warning", "run", "vm.toml"],
    ["--log-level=debug", "--log-level", "error", "run", "vm.toml"],
    ["run", "--no-seccomp", "--api-sock", "s", "vm.toml"],
    ["run", "vm.toml", "--api-sock=/run/a b.sock", "--no-seccomp"],
    ["run", "--backend-user", "", "vm.toml"],
    ["run", "--backend-user=", "--api-sock=", "vm.toml"],
    ["run", "--backend-user", "daemon", "vm=1.toml"],
    ["run", ""],
    ["run", "run"],
]

LEFT_TO_ARGPARSE = [
    [], ["run"], ["--help"], ["run", "--help"], ["run", "-h", "vm.toml"],
    ["run", "a.toml", "b.toml"], ["run", "--", "vm.toml"], ["run", "-"],
    ["run", "--no-sec", "vm.toml"], ["run", "--api", "s", "vm.toml"],
    ["run", "--no-seccomp", "--no-seccomp", "vm.toml"],
    ["run", "--api-sock", "a", "--api-sock", "b", "vm.toml"],
    ["run", "vm.toml", "--api-sock"], ["run", "--api-sock", "-5", "vm.toml"],
    ["run", "--no-seccomp=1", "vm.toml"], ["run", "vm.toml", "--bogus"],
    ["--log-level", "loud", "run", "vm.toml"], ["--log", "info", "run", "vm.toml"],
    ["--log-level"], ["validate", "vm.toml"], ["status", "sock"], ["runn", "vm.toml"],
]


@pytest.mark.parametrize("argv", READ_WITHOUT_ARGPARSE, ids=lambda a: " ".join(a) or "(none)")
def test_run_command_lines_are_read_as_the_whole_parser_reads_them(argv: list[str]) -> None:
    args = cli.run_args(argv)
    assert args is not None
    assert vars(args) == vars(cli.build_parser().parse_args(argv))


@pytest.mark.parametrize("argv", LEFT_TO_ARGPARSE, ids=lambda a: " ".join(a) or "(none)")
def test_anything_else_is_left_to_argparse(argv: list[str]) -> None:
    assert cli.run_args(argv) is None


def test_pymvm_run_imports_no_argparse_and_argparse_still_answers_errors() -> None:
    code = ("import sys; from pymvm import cli; "
            "cli.cmd_run = lambda args: print(args.config, args.api_sock, 'argparse' in sys.modules, "
            "'gettext' in sys.modules) or 0; sys.exit(cli.main(sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", code, "--log-level", "error", "run", "vm.toml",
                          "--api-sock", "s"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout) == (0, "vm.toml s False False\n"), out.stderr
    out = subprocess.run([sys.executable, "-m", "pymvm.cli", "run", "vm.toml", "--bogus"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "unrecognized arguments: --bogus" in out.stderr
