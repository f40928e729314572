"""Every tier: under scripts/test (and so CI) a skipped test is a failed test.

A developer running pytest by hand gets skips with their reasons, as usual. scripts/test sets
PYMVM_TEST_NO_SKIPS=1, having first checked what this machine has; for each thing it truly
lacks it names a tier in PYMVM_TEST_MACHINE_LACKS (space-separated, and says so in its
output):

    kvm       /dev/kvm is missing or unusable     skips in tests/kvm are allowed
    interop   a third-party peer is missing       skips in tests/interop are allowed
    e2e       no Linux-capable KVM, nested or not skips in tests/e2e are allowed
    root      not root, or no /dev/net/tun        skips whose reason mentions root are allowed

Any other skip then fails the run with its reason, so a tier cannot pass by not running.
An expected failure (xfail) is not a skip and is left alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NO_SKIPS_ENV = "PYMVM_TEST_NO_SKIPS"
LACKS_ENV = "PYMVM_TEST_MACHINE_LACKS"
TESTS_DIR = Path(__file__).resolve().parent


def _tier(path: Path) -> str | None:
    """The tier directory (unit, kvm, interop, e2e...) a test file lives in."""
    try:
        return path.resolve().relative_to(TESTS_DIR).parts[0]
    except (ValueError, IndexError):
        return None


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def skip_is_excused(tier: str | None, reason: str, lacks: set[str]) -> bool:
    """Whether scripts/test said the machine lacks what this skipped test needs."""
    if tier is not None and tier in lacks:
        return True
    return "root" in lacks and "root" in reason.lower()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    if os.environ.get(NO_SKIPS_ENV) != "1":
        return
    lacks = set(os.environ.get(LACKS_ENV, "").split())
    tier = _tier(Path(str(item.path)))
    reason = _skip_reason(report)
    if skip_is_excused(tier, reason, lacks):
        return
    report.outcome = "failed"
    report.longrepr = (
        f"skipped under scripts/test ({NO_SKIPS_ENV}=1), where this machine has what the "
        f"{tier or 'test'} tier needs: {reason}\n"
        "Install or enable what the reason names (scripts/setup does it in CI), or run "
        "pytest by hand to see skips as skips."
    )
