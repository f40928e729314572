"""`@name` artifacts resolved from the builders' record (pymvm.images.artifacts)."""

from __future__ import annotations

import os
from pathlib import Path

from pymvm.images.artifacts import fresh_artifact, record_artifact


def _setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cache = tmp_path / "cache"
    artifact = tmp_path / "vmlinux"
    artifact.write_bytes(b"kernel")
    source = tmp_path / "fragment.config"
    source.write_text("CONFIG_X=y\n")
    record_artifact("microvm-kernel", artifact, [source], cache_dir=cache)
    return cache, artifact, source


def test_recorded_artifact_resolves_while_its_inputs_are_unchanged(tmp_path: Path) -> None:
    cache, artifact, _ = _setup(tmp_path)
    assert fresh_artifact("microvm-kernel", cache_dir=cache) == artifact


def test_a_changed_input_makes_the_record_stale(tmp_path: Path) -> None:
    cache, _, source = _setup(tmp_path)
    source.write_text("CONFIG_X=no\n")  # another size
    assert fresh_artifact("microvm-kernel", cache_dir=cache) is None


def test_an_input_touched_with_the_same_size_makes_the_record_stale(tmp_path: Path) -> None:
    cache, _, source = _setup(tmp_path)
    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert fresh_artifact("microvm-kernel", cache_dir=cache) is None


def test_a_removed_input_or_artifact_makes_the_record_stale(tmp_path: Path) -> None:
    cache, artifact, source = _setup(tmp_path)
    source.unlink()
    assert fresh_artifact("microvm-kernel", cache_dir=cache) is None
    cache, artifact, source = _setup(tmp_path / "again")
    artifact.unlink()
    assert fresh_artifact("microvm-kernel", cache_dir=cache) is None


def test_no_record_or_a_corrupt_one_resolves_to_nothing(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert fresh_artifact("test-initramfs", cache_dir=cache) is None
    (cache / "artifacts").mkdir(parents=True)
    (cache / "artifacts" / "test-initramfs.json").write_text("{not json")
    assert fresh_artifact("test-initramfs", cache_dir=cache) is None
    (cache / "artifacts" / "test-initramfs.json").write_text('{"path": 3}')
    assert fresh_artifact("test-initramfs", cache_dir=cache) is None


def test_a_record_matches_across_file_systems_with_and_without_sub_second_times(
        tmp_path: Path) -> None:
    # Written where times have nanoseconds, read where they are whole seconds (9p), or back.
    cache, artifact, source = _setup(tmp_path)
    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, (st.st_mtime_ns // 10**9) * 10**9))
    assert fresh_artifact("microvm-kernel", cache_dir=cache) == artifact
