"""The nested-host soak's report (bench/nested_soak.py): a freeze or death is charged to the
setting whose boot was in progress, and completed boots are counted per setting."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def soak():
    spec = importlib.util.spec_from_file_location("nested_soak", ROOT / "bench" / "nested_soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table(out: str) -> dict[str, list[int]]:
    rows = {}
    for line in out.splitlines():
        parts = line.rsplit(None, 5)
        if len(parts) == 6 and all(p.isdigit() for p in parts[1:]):
            rows[parts[0].strip()] = [int(p) for p in parts[1:]]
    return rows


def test_a_freeze_is_charged_to_the_boot_that_was_running_and_a_death_between_boots_to_none(
        soak, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = soak.SETTINGS[0], soak.SETTINGS[5]
    records = [
        {"event": "start", "host": 1, "setting": a}, {"event": "end", "host": 1, "setting": a, "ok": True},
        {"event": "start", "host": 1, "setting": b},  # host 1 froze during this boot
        {"event": "start", "host": 2, "setting": a}, {"event": "end", "host": 2, "setting": a, "ok": False},
        {"event": "start", "host": 2, "setting": b}, {"event": "end", "host": 2, "setting": b, "ok": True},
    ]
    soak.report(records, {1: "froze", 2: "died", 3: "ok"})
    out = capsys.readouterr().out
    rows = _table(out)
    # columns: completed, guest_failures, froze, died, timed_out
    assert rows[a] == [1, 1, 0, 0, 0]
    assert rows[b] == [1, 0, 1, 0, 0]
    assert rows["between boots"] == [0, 0, 0, 1, 0]
    assert rows["total"] == [2, 1, 1, 1, 0]
    assert "soak_boots=4" in out and "soak_host_failures=2" in out and "soak_hosts=3" in out


def test_every_setting_combines_vmm_vcpus_and_nic(soak) -> None:
    assert len(soak.SETTINGS) == 8
    assert {s.split("-", 2)[0] for s in soak.SETTINGS} == {"pymvm", "qemu"}
    assert {s.split("-", 2)[2] for s in soak.SETTINGS} == {"none", "vhost-net"}
