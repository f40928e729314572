"""The fuzzing harnesses (bench/fuzz, issue 14) run in CI: a short smoke of each, and the
crash accounting checked with a harness that crashes on purpose."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FUZZ = REPO / "bench" / "fuzz.py"
EXPECTED = ("vhost_user_decoder", "backend_session", "frontend_session_client",
            "frontend_session_server", "virtqueue", "virtio_mmio", "config", "api")


def results(stdout: str) -> dict[str, float]:
    return {k: float(v) for k, v in re.findall(r"^fuzz_(\w+)=([\d.]+)$", stdout, re.M)}


def test_every_fuzz_harness_runs_its_inputs_without_a_crash(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(FUZZ), "-n", "150", "--corpus", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    got = results(out.stdout)
    for name in EXPECTED:
        assert got.get(f"{name}_inputs") == 150, (name, out.stdout, out.stderr[-3000:])
        assert got.get(f"{name}_crashes") == 0, (name, out.stderr[-3000:])
        assert got.get(f"{name}_inputs_per_s", 0) > 0
    assert out.returncode == 0


def test_fuzz_counts_crashes_and_keeps_the_crashing_input(tmp_path: Path) -> None:
    # A crashing input already in the harness's corpus: the run must count it and keep it,
    # whether or not the fuzzer's own mutations reach one within the run.
    corpus = tmp_path / "selftest" / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "seed-crash").write_bytes(b"Crash")
    out = subprocess.run([sys.executable, str(FUZZ), "-n", "3000", "-k", "selftest",
                          "--corpus", str(tmp_path)], capture_output=True, text=True, timeout=300)
    got = results(out.stdout)
    assert out.returncode == 1
    assert got["selftest_crashes"] >= 1
    kept = list((tmp_path / "selftest" / "crashes").glob("crash-*"))
    assert kept and all(p.read_bytes()[:1] == b"C" for p in kept)
