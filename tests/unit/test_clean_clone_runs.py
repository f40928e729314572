"""scripts/clean-clone-runs counts consecutive clean-clone runs of `.ci/run` (issue 8): its
accounting, from scripts/test's own output."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.script_loader import load_script

ccr = load_script("clean-clone-runs", "pymvm_clean_clone_runs")

ONE_ATTEMPT = """setup: done
scripts/test: unit, kvm and interop tiers (07:09:32)
scripts/test: mutation testing smoke run (07:11:52)
scripts/test: e2e tier, attempt 1 (07:12:03)
scripts/test: all tiers passed (07:26:40)
"""
RETRIED = """scripts/test: e2e tier, attempt 1 (07:12:03)
scripts/test: the nested KVM host crashed, froze or timed out (status 124): not a test result; 12 test(s) ended so far
scripts/test: e2e tier, attempt 2 (07:20:10)
scripts/test: all tiers passed (07:35:00)
"""
FAILED = """scripts/test: e2e tier, attempt 1 (07:12:03)
scripts/test: FAILED at 07:30:00 (host tiers: 0, e2e: 1)
"""


def test_attempts_are_read_from_scripts_tests_output() -> None:
    assert ccr.e2e_attempts(ONE_ATTEMPT) == 1
    assert ccr.e2e_attempts(RETRIED) == 2
    assert ccr.e2e_attempts("setup: failed before any test\n") == 0


def test_a_pass_needs_status_0_and_scripts_tests_own_word() -> None:
    assert ccr.result_of("abc", 60, 0, ONE_ATTEMPT).first_attempt
    retried = ccr.result_of("abc", 60, 0, RETRIED)
    assert retried.passed and not retried.first_attempt
    assert not ccr.result_of("abc", 60, 1, FAILED).passed
    # status 0 without "all tiers passed" (a setup that exited early, say) is no pass
    silent = ccr.result_of("abc", 60, 0, "setup: done\n")
    assert not silent.passed and silent.exit_status == 1


def test_consecutive_first_attempts_stop_at_the_first_run_that_was_not_one() -> None:
    ok = ccr.result_of("a", 1, 0, ONE_ATTEMPT)
    retried = ccr.result_of("b", 1, 0, RETRIED)
    failed = ccr.result_of("c", 1, 1, FAILED)
    assert ccr.consecutive_first_attempts([ok, ok, ok]) == 3
    assert ccr.consecutive_first_attempts([ok, retried, ok]) == 1
    assert ccr.consecutive_first_attempts([failed, ok]) == 0
    assert ccr.consecutive_first_attempts([]) == 0
    assert ccr.summary([ok, retried, failed]).splitlines() == [
        "clean_clone_runs=3", "clean_clone_runs_passed=2", "clean_clone_runs_first_attempt=1"]


def test_describe_names_the_commit_attempts_and_outcome() -> None:
    line = ccr.describe(2, ccr.result_of("1a2b3c4", 1200, 1, FAILED))
    assert line == "run 2: 1a2b3c4 20.0 min, e2e attempts 1, FAILED (status 1)"


def test_fewer_than_one_run_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        ccr.main(["-n", "0"])
    assert exc.value.code == 2
    assert "--runs 0: give at least 1" in capsys.readouterr().err


def fake_repository(path: Path, ci_run: str) -> Path:
    """A git repository whose `.ci/run` prints ``ci_run`` (a shell script body) and whose
    scripts/setup records that it ran."""
    import subprocess

    (path / ".ci").mkdir(parents=True)
    (path / "scripts").mkdir()
    (path / ".ci" / "run").write_text("#!/bin/sh\n" + ci_run)
    (path / "scripts" / "setup").write_text("#!/bin/sh\ntouch \"$(dirname \"$0\")/../setup-ran\"\n")
    for f in (path / ".ci" / "run", path / "scripts" / "setup"):
        f.chmod(0o755)
    git = ["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "fake"], check=True)
    return path


def test_runs_clone_the_repository_run_ci_keep_each_log_and_point_setup_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = fake_repository(tmp_path / "repo", "echo 'scripts/test: e2e tier, attempt 1 (x)'\n"
                           "echo 'scripts/test: all tiers passed (y)'\n"
                           "mkdir -p results/mutation && echo '<x/>' > results/e2e-junit.xml\n"
                           "touch results/mutation/big.log\n"
                           "test -d .git && test ! -e setup-ran\n")  # a fresh clone each time
    monkeypatch.setattr(ccr, "REPO", repo)
    assert ccr.main(["-n", "2", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count(", e2e attempts 1, passed") == 2
    assert out.strip().endswith("clean_clone_runs_first_attempt=2")
    logs = repo / "results" / "clean-clone-runs"
    assert "all tiers passed" in (logs / "run-2.log").read_text()
    # What the tests left in the clone's results/ is kept, its folders are not.
    assert (logs / "run-2" / "e2e-junit.xml").read_text() == "<x/>\n"
    assert sorted(p.name for p in (logs / "run-1").iterdir()) == ["e2e-junit.xml"]
    assert (repo / "setup-ran").exists()  # the editable install pointed back here
    assert not list(tmp_path.glob("pymvm-clean-clone-*"))  # the clones are gone


def test_a_failed_run_stops_the_runs_and_fails_the_script(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = fake_repository(tmp_path / "repo", "echo 'scripts/test: e2e tier, attempt 1 (x)'\n"
                           "echo 'scripts/test: FAILED at z (host tiers: 1, e2e: 0)'\nexit 1\n")
    monkeypatch.setattr(ccr, "REPO", repo)
    assert ccr.main(["-n", "3", "--workdir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "run 1: " in out and "FAILED (status 1)" in out and "run 2: " not in out
    assert "clean_clone_runs=1\nclean_clone_runs_passed=0" in out
