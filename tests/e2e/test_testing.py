"""pymvm.testing's pytest plugin run by pytest itself (pytester) with real guests: the README's
example test, and a two-VM factory test on a bridge whose failing neighbour gets the VMs'
consoles and VMM logs in its report."""

from __future__ import annotations

from pathlib import Path


from .conftest import unique

pytest_plugins = ["pytester"]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "test_microvm.py"


def test_testing_readme_example_passes_through_pytester(pytester) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    example = EXAMPLE.read_text()
    body = example.split("\n\n\n", 1)[1].strip()
    assert body in readme, "the README shows the same test as examples/test_microvm.py"
    assert len(body.splitlines()) <= 10
    pytester.makepyfile(test_example=example)
    result = pytester.runpytest("-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=1)


def test_testing_factory_two_vms_on_a_bridge_and_a_failing_report_carries_the_console(pytester) -> None:
    bridge, tap_a, tap_b = unique("pmtbr"), unique("pmta"), unique("pmtb")
    pytester.makepyfile(f'''
        def test_two_vms_ping_each_other(microvm_factory):
            a = microvm_factory(net=[{{"tap": "{tap_a}", "ip": "10.77.0.2/24", "bridge": "{bridge}"}}])
            b = microvm_factory(net=[{{"tap": "{tap_b}", "ip": "10.77.0.3/24", "bridge": "{bridge}"}}])
            assert a.cid != b.cid
            r = a.run("ping -c 2 -W 5 10.77.0.3", timeout=60)
            assert r.returncode == 0, r.stdout + r.stderr
            assert "10.77.0.3/24" in b.run("ip addr show eth0").stdout

        def test_failure_report_has_the_console(microvm):
            microvm.run("echo marker-in-the-guest > /dev/console")
            assert microvm.run("false").returncode == 0
    ''')
    result = pytester.runpytest("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*pymvm microvm-* console*", "*marker-in-the-guest*",
                                 "*pymvm microvm-* VMM log*", "*vm_starting*"])
