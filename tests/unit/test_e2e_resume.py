"""The e2e tier's resume across nested-host attempts (tests/e2e/conftest.py).

scripts/test reruns the tier in a fresh nested host when one froze under it; the tests that
already ended must not run again, and a failure in an earlier attempt must still fail the run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ("pytester",)

E2E_CONFTEST = Path(__file__).resolve().parents[1] / "e2e" / "conftest.py"

TESTS = '''
import os

def test_a_passes():
    pass

def test_b_fails():
    assert False, "a real failure"

def test_c_is_where_the_host_froze():
    if os.environ.get("FREEZE") == "1":
        os._exit(1)  # the whole run ends here, as when the nested host freezes
'''


@pytest.fixture
def e2e_dir(pytester: pytest.Pytester) -> pytest.Pytester:
    tests = pytester.mkdir("tests")
    (tests / "__init__.py").write_text("")
    e2e = tests / "e2e"
    e2e.mkdir()
    (e2e / "__init__.py").write_text("")
    (e2e / "conftest.py").write_text(E2E_CONFTEST.read_text())
    (e2e / "test_sample.py").write_text(TESTS)
    return pytester


def test_second_attempt_runs_only_what_did_not_end_and_keeps_earlier_failures(
    e2e_dir: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    progress = e2e_dir.path / "progress.txt"
    monkeypatch.setenv("PYMVM_E2E_PROGRESS", str(progress))
    monkeypatch.setenv("PYMVM_NESTED", "never")  # collect normally: nothing boots here

    stale = e2e_dir.path / "progress-failures.txt"
    stale.write_text("===== FAILED tests/e2e/test_sample.py::test_old (call)\nfrom another run\n")
    monkeypatch.setenv("FREEZE", "1")
    first = e2e_dir.runpytest_subprocess("tests/e2e", "-p", "no:cacheprovider")
    assert first.ret == 1  # the "frozen" process died
    assert progress.read_text().splitlines() == [
        "passed tests/e2e/test_sample.py::test_a_passes",
        "failed tests/e2e/test_sample.py::test_b_fails",
    ]

    monkeypatch.setenv("FREEZE", "0")
    second = e2e_dir.runpytest_subprocess("tests/e2e", "-p", "no:cacheprovider")
    second.stdout.fnmatch_lines([
        "*2 test(s) already ended in an earlier attempt of this run (1 passed)*",
        "*FAILED tests/e2e/test_sample.py::test_b_fails*",
    ])
    second.stdout.fnmatch_lines(["*===== FAILED tests/e2e/test_sample.py::test_b_fails (call)*",
                                 "*a real failure*"])  # its report, kept from attempt 1
    assert "from another run" not in second.stdout.str()  # an earlier run's texts are gone
    second.assert_outcomes(passed=1, deselected=2)
    assert second.ret == 1  # test_b's earlier failure still fails the run
    assert progress.read_text().splitlines()[-1] == (
        "passed tests/e2e/test_sample.py::test_c_is_where_the_host_froze"
    )


def test_without_a_progress_file_every_test_runs(
    e2e_dir: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYMVM_E2E_PROGRESS", raising=False)
    monkeypatch.setenv("PYMVM_NESTED", "never")
    result = e2e_dir.runpytest_subprocess("tests/e2e", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
