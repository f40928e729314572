"""tests/conftest.py: under scripts/test a skip fails the run, unless scripts/test said the
machine lacks what the tier needs. Checked on a throw-away test tree run by a real pytest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

TESTS = {
    "kvm/test_k.py": """
import pytest

def test_kvm_skips():
    pytest.skip("/dev/kvm does not exist")
""",
    "unit/test_u.py": """
import pytest

@pytest.mark.skipif(True, reason="needs root and /dev/net/tun")
def test_root_only():
    pass

@pytest.mark.skipif(True, reason="busybox not installed")
def test_needs_busybox():
    pass

@pytest.mark.xfail(reason="known", strict=True)
def test_expected_failure():
    assert False

def test_passes():
    pass
""",
}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    tests = tmp_path / "tests"
    for rel, text in TESTS.items():
        (tests / rel).parent.mkdir(parents=True, exist_ok=True)
        (tests / rel).write_text(text)
    shutil.copy(CONFTEST, tests / "conftest.py")
    return tmp_path


def outcomes(tree: Path, **env: str) -> dict[str, str]:
    """{test name: PASSED | SKIPPED | FAILED | ERROR | XFAIL} of one pytest run in ``tree``."""
    environ = {k: v for k, v in os.environ.items()
               if k not in ("PYMVM_TEST_NO_SKIPS", "PYMVM_TEST_MACHINE_LACKS")}
    junit = tree / "junit.xml"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={junit}",
         "tests"], cwd=tree, capture_output=True, text=True, env={**environ, **env}, timeout=120)
    found = {}
    for case in ElementTree.parse(junit).iter("testcase"):
        kinds = {child.tag: child for child in case}
        if "error" in kinds:
            found[case.get("name")] = "ERROR"
        elif "failure" in kinds:
            found[case.get("name")] = "FAILED"
        elif "skipped" in kinds:
            xfail = kinds["skipped"].get("type") == "pytest.xfail"
            found[case.get("name")] = "XFAIL" if xfail else "SKIPPED"
        else:
            found[case.get("name")] = "PASSED"
    assert len(found) == 5, run.stdout + run.stderr
    return found


def test_by_hand_skips_stay_skips(tree: Path) -> None:
    got = outcomes(tree)
    assert got["test_kvm_skips"] == got["test_root_only"] == got["test_needs_busybox"] == "SKIPPED"
    assert got["test_passes"] == "PASSED" and got["test_expected_failure"] == "XFAIL"


def test_under_scripts_test_every_skip_fails(tree: Path) -> None:
    got = outcomes(tree, PYMVM_TEST_NO_SKIPS="1")
    assert got["test_kvm_skips"] == "FAILED"
    assert got["test_root_only"] == got["test_needs_busybox"] == "ERROR"  # skipped at setup
    assert got["test_passes"] == "PASSED" and got["test_expected_failure"] == "XFAIL"


def test_a_tier_the_machine_lacks_may_skip_and_no_other(tree: Path) -> None:
    got = outcomes(tree, PYMVM_TEST_NO_SKIPS="1", PYMVM_TEST_MACHINE_LACKS="kvm")
    assert got["test_kvm_skips"] == "SKIPPED"
    assert got["test_root_only"] == got["test_needs_busybox"] == "ERROR"


def test_without_root_only_root_needing_skips_are_excused(tree: Path) -> None:
    got = outcomes(tree, PYMVM_TEST_NO_SKIPS="1", PYMVM_TEST_MACHINE_LACKS="root")
    assert got["test_root_only"] == "SKIPPED"
    assert got["test_needs_busybox"] == "ERROR" and got["test_kvm_skips"] == "FAILED"
