"""The nested-host soak's report (bench/nested_soak.py): a freeze or death is charged to the
setting whose boot was in progress, and completed boots are counted per setting."""

from __future__ import annotations

import pytest

from .script_loader import load_bench


@pytest.fixture(scope="module")
def soak():
    return load_bench("nested_soak.py", "nested_soak")


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
    assert "nested_freezes_per_100_boots=50.0 (2 in 4 boots, 3 hosts)" in out


def test_compared_nested_settings_get_their_own_freeze_rate(soak, capsys) -> None:
    a = soak.SETTINGS[0]
    records = []
    for host in (1, 2, 3, 4):
        records += [{"event": "start", "host": host, "setting": a},
                    {"event": "end", "host": host, "setting": a, "ok": True},
                    {"event": "start", "host": host, "setting": a}]
        if host != 2:
            records.append({"event": "end", "host": host, "setting": a, "ok": True})
    soak.report(records, {1: "ok", 2: "froze", 3: "ok", 4: "ok"},
                {1: "chosen", 2: "compared", 3: "chosen", 4: "compared"})
    out = capsys.readouterr().out
    assert "nested_freezes_per_100_boots=0.0 (0 in 4 boots, 2 hosts)" in out
    assert "nested_freezes_per_100_boots_compared=25.0 (1 in 4 boots, 2 hosts)" in out


def test_every_setting_combines_vmm_vcpus_and_nic(soak) -> None:
    assert len(soak.SETTINGS) == 12
    assert {s.split("-", 2)[0] for s in soak.SETTINGS} == {"pymvm", "qemu"}
    assert {s.split("-", 2)[2] for s in soak.SETTINGS} == {"none", "vhost-net", "iperf"}


@pytest.mark.parametrize("nic, out, ok", [
    ("none", "PYMVM-READY", True),
    ("none", "Kernel panic", False),
    ("vhost-net", "PYMVM-READY 100 packets transmitted, 98 received", True),
    ("vhost-net", "PYMVM-READY 100 packets transmitted, 0 received", False),
    ("iperf", "PYMVM-READY [SUM] 0.00-20.00 sec 300 MBytes receiver", True),
    ("iperf", "PYMVM-READY iperf3: error - unable to connect to server", False),
])
def test_a_boot_counts_only_when_the_guest_did_its_job(soak, nic: str, out: str, ok: bool) -> None:
    assert soak.check_output(nic, 0, out)[0] is ok


def test_unknown_settings_are_refused_naming_the_valid_ones(soak, monkeypatch, capsys) -> None:
    monkeypatch.setattr("sys.argv", ["nested_soak", "--settings", "pymvm-1cpu-iperf,pymvm-9cpu"])
    with pytest.raises(SystemExit) as exc:
        soak.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown setting(s) pymvm-9cpu" in err and "qemu-2cpu-iperf" in err


def test_compare_takes_the_nested_hosts_experiment_variables_only(soak) -> None:
    assert soak.parse_assignments(soak.OLD_SETTING) == {"PYMVM_NESTED_APPEND": "none",
                                                        "PYMVM_NESTED_WAKE": "0"}
    with pytest.raises(ValueError, match="NAME=VALUE words"):
        soak.parse_assignments("PATH=/tmp")
    with pytest.raises(ValueError, match="NAME=VALUE words"):
        soak.parse_assignments("PYMVM_NESTED_WAKE")


def test_wake_ups_are_counted_per_nested_host_setting(soak, capsys) -> None:
    a = soak.SETTINGS[0]
    records = []
    for host in (1, 2, 3):
        records += [{"event": "start", "host": host, "setting": a},
                    {"event": "end", "host": host, "setting": a, "ok": True}]
    soak.report(records, {1: "ok", 2: "ok", 3: "ok"}, {1: "chosen", 2: "compared", 3: "chosen"},
                {1: 2, 2: 0, 3: 1})
    out = capsys.readouterr().out
    assert "nested_wakes=3" in out and "nested_wakes_compared=0" in out
    assert "nested_freezes_per_100_boots=0.0 (0 in 2 boots, 2 hosts)" in out



def test_the_iperf_settings_transfer_runs_for_the_seconds_asked(soak) -> None:
    assert f"-t {soak.IPERF_S} " in soak._guest_cmd("iperf")
    assert "-t 120 --bidir" in soak._guest_cmd("iperf", 120)
    assert "iperf3" not in soak._guest_cmd("vhost-net", 120)
