"""The nested-host benchmarks' wrappers: each runs its script in a fresh nested host with the
shared knobs (one CPU and three attempts unless the environment says otherwise: issue 8's
retry, never mixing two hosts' numbers in one ratio)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name,script", [("api", "api.py"), ("block", "block.py"),
                                         ("boot", "boot.py"), ("net", "net.py"),
                                         ("swap", "swap.py"), ("vhost-user", "vhost_user.py")])
def test_each_nested_benchmark_wrapper_runs_its_script_with_the_shared_knobs(name, script) -> None:
    wrapper = ROOT / "bench" / name
    line = next(x for x in wrapper.read_text().splitlines() if x.startswith("exec "))
    assert re.fullmatch(
        r'exec "\$python" -m pymvm\.nested --cpus "\$\{PYMVM_NESTED_CPUS:-1\}" '
        r'--attempts "\$\{PYMVM_BENCH_ATTEMPTS:-3\}" -- "\$python" bench/'
        + re.escape(script) + r' .*', line), line
    assert wrapper.stat().st_mode & 0o111
