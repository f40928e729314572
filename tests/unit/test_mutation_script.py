"""scripts/mutation's reading of mutmut's results and its score (the mutmut run itself is
smoke-tested by scripts/test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.script_loader import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "mutation"


mutation = load_script("mutation", "pymvm_mutation_script")

RESULTS = """\
    pymvm.net.host.x__ipr__mutmut_1: killed
    pymvm.net.host.xǁHostNetworkǁclose__mutmut_2: survived
    pymvm.net.host.xǁHostNetworkǁ_detach__mutmut_3: timeout
    pymvm.net.host.xǁHostNetworkǁ_detach__mutmut_4: no tests
    pymvm.vhost.user.backend.xǁ_SessionǁX__mutmut_1: segfault
    pymvm.vhost.user.backend.xǁ_SessionǁX__mutmut_2: killed
"""


def test_results_are_grouped_by_module_path() -> None:
    by_module = mutation.parse_results(RESULTS)
    assert sorted(by_module) == ["pymvm/net/host.py", "pymvm/vhost/user/backend.py"]
    assert by_module["pymvm/net/host.py"]["pymvm.net.host.x__ipr__mutmut_1"] == "killed"
    assert by_module["pymvm/net/host.py"][
        "pymvm.net.host.xǁHostNetworkǁ_detach__mutmut_4"] == "no tests"


def test_score_counts_timeouts_and_crashes_as_killed_and_untested_as_survived() -> None:
    by_module = mutation.parse_results(RESULTS)
    value, counts = mutation.score(by_module["pymvm/net/host.py"])
    assert value == pytest.approx(2 / 4)  # killed + timeout over those + survived + no tests
    assert counts["timeout"] == 1 and counts["no tests"] == 1
    value, _ = mutation.score(by_module["pymvm/vhost/user/backend.py"])
    assert value == 1.0


def test_score_of_no_mutants_is_none() -> None:
    assert mutation.score({})[0] is None


def test_unknown_module_is_refused_with_status_2() -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "pymvm/nope.py"], capture_output=True,
                         text=True)
    assert run.returncode == 2
    assert "pymvm/nope.py does not exist" in run.stderr


def test_a_worker_death_counts_only_if_plain_pytest_fails_under_the_mutant(
        monkeypatch, tmp_path: Path) -> None:
    ran: list[str] = []

    class Run:
        def __init__(self, returncode: int) -> None:
            self.returncode = returncode

    def fake_run(argv, *, cwd, env, **kwargs):
        ran.append(env["MUTANT_UNDER_TEST"])
        assert cwd == tmp_path / "mutants" and argv[-1] == "tests/unit/test_x.py"
        return Run(0 if env["MUTANT_UNDER_TEST"].endswith("_1") else 1)

    monkeypatch.setattr(mutation.subprocess, "run", fake_run)
    by_module = {"pymvm/a.py": {"pymvm.a.x_f__mutmut_1": "segfault",
                                "pymvm.a.x_f__mutmut_2": "segfault",
                                "pymvm.a.x_f__mutmut_3": "survived"}}
    mutation.recheck_crashes(tmp_path, by_module, ["tests/unit/test_x.py"], 30, {})
    assert by_module["pymvm/a.py"] == {"pymvm.a.x_f__mutmut_1": "survived",
                                       "pymvm.a.x_f__mutmut_2": "killed",
                                       "pymvm.a.x_f__mutmut_3": "survived"}
    assert sorted(ran) == ["pymvm.a.x_f__mutmut_1", "pymvm.a.x_f__mutmut_2"]
