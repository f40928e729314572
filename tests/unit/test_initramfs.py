"""The pure-Python cpio newc writer, the /init script and the test initramfs."""

import io
import shutil
import stat
import struct
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pymvm import layout
from pymvm.images import initramfs
from pymvm.images.initramfs import (EXIT_RE, NEWC_HEADER_LEN, READY_RE, CpioWriter,
                                    InitramfsError, decode_cmd, elf_interpreter, encode_cmd,
                                    encode_net, parse_ldd, read_newc, render_init_script)


def sample_archive() -> bytes:
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.add_dir("bin")
    w.add_file("/bin/busybox", b"\x7fELF" + b"x" * 13, 0o755)
    w.add_symlink("bin/sh", "busybox")
    w.add_chardev("dev/console", 5, 1)
    w.add_file("init", b"#!/bin/sh\n", 0o755)
    w.add_file("empty", b"")
    w.finish()
    return buf.getvalue()


def test_newc_archive_parses_back_to_the_same_entries():
    entries = {e.name: e for e in read_newc(sample_archive())}
    assert list(entries) == ["bin", "bin/busybox", "bin/sh", "dev/console", "init", "empty"]
    assert entries["bin"].mode == stat.S_IFDIR | 0o755
    assert entries["bin/busybox"].mode == stat.S_IFREG | 0o755
    assert entries["bin/busybox"].data == b"\x7fELF" + b"x" * 13
    assert entries["bin/sh"].mode == stat.S_IFLNK | 0o777 and entries["bin/sh"].data == b"busybox"
    assert entries["dev/console"].mode == stat.S_IFCHR | 0o600
    assert entries["dev/console"].rdev == (5, 1)
    assert entries["empty"].data == b""
    assert len({e.ino for e in entries.values()}) == len(entries)


def test_newc_headers_are_ascii_hex_and_every_header_is_4_byte_aligned():
    data = sample_archive()
    assert len(data) % 4 == 0
    pos = 0
    seen = []
    while True:
        assert pos % 4 == 0
        header = data[pos:pos + NEWC_HEADER_LEN]
        assert header[:6] == b"070701"
        int(header[6:], 16)  # 13 fields of 8 hex digits
        namesize, size = int(header[94:102], 16), int(header[54:62], 16)
        name = data[pos + 110:pos + 110 + namesize]
        assert name.endswith(b"\0")
        seen.append(name[:-1].decode())
        if seen[-1] == "TRAILER!!!":
            break
        name_end = pos + 110 + namesize
        pos = name_end + (-name_end % 4) + size
        pos += -pos % 4
    assert seen[-1] == "TRAILER!!!" and pos + 110 + namesize + (-(110 + namesize) % 4) == len(data)


def test_archive_without_trailer_is_rejected():
    data = sample_archive()
    with pytest.raises(InitramfsError, match="truncated"):
        read_newc(data[:data.rfind(b"070701")])


def test_adding_a_path_twice_is_rejected():
    w = CpioWriter(io.BytesIO())
    w.add_dir("bin")
    with pytest.raises(InitramfsError, match="twice"):
        w.add_dir("/bin")


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")
def test_gnu_cpio_lists_the_archive(tmp_path):
    archive = tmp_path / "a.cpio"
    archive.write_bytes(sample_archive())
    listed = subprocess.run(["cpio", "-t", "--quiet"], stdin=archive.open("rb"),
                            capture_output=True, text=True, check=True).stdout.split()
    assert listed == ["bin", "bin/busybox", "bin/sh", "dev/console", "init", "empty"]


def test_init_script_pokes_the_boot_timer_from_layout(monkeypatch):
    script = render_init_script()
    assert f"devmem 0x{layout.BOOT_TIMER_ADDR:x} 8 {layout.BOOT_TIMER_MAGIC}" in script
    monkeypatch.setattr(layout, "BOOT_TIMER_ADDR", 0xE000_0000)
    monkeypatch.setattr(layout, "BOOT_TIMER_MAGIC", 42)
    assert "devmem 0xe0000000 8 42" in render_init_script()


def test_init_script_prints_markers_and_reboots_with_no_placeholder_left():
    script = render_init_script()
    assert "@@" not in script
    assert 'echo "PYMVM-READY cpus=$cpus"' in script
    assert 'echo "PYMVM-EXIT $rc"' in script
    # The boot timer is written just before the ready line.
    assert script.index("devmem") < script.index("PYMVM-READY cpus=")
    assert script.rstrip().endswith("reboot -f")


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox not installed")
def test_init_script_is_valid_busybox_shell(tmp_path):
    path = tmp_path / "init"
    path.write_text(render_init_script())
    subprocess.run(["busybox", "sh", "-n", str(path)], check=True)


@given(st.text())
def test_encode_cmd_round_trips_and_is_one_cmdline_token(command):
    token = encode_cmd(command)
    assert token.startswith("pymvm.cmd=")
    assert not any(c.isspace() for c in token)
    assert decode_cmd(token) == command


def test_encode_net_builds_the_token_and_requires_a_prefix():
    assert encode_net("eth0", "10.0.2.15/24", "10.0.2.2") == "pymvm.net=eth0,10.0.2.15/24,10.0.2.2"
    assert encode_net("eth1", "10.1.0.2/30") == "pymvm.net=eth1,10.1.0.2/30"
    with pytest.raises(InitramfsError, match="PREFIX"):
        encode_net("eth0", "10.0.2.15")


def test_marker_regexes_match_serial_lines():
    console = "[    1.0] booting\r\nPYMVM-READY cpus=4\r\nhello\r\nPYMVM-EXIT 3\r\n"
    assert READY_RE.search(console).group(1) == "4"
    assert EXIT_RE.search(console).group(1) == "3"
    assert READY_RE.search("xPYMVM-READY cpus=4\n") is None


def test_parse_ldd_keeps_resolved_libraries_and_the_loader_but_not_the_vdso():
    out = """\
\tlinux-vdso.so.1 (0x00007ffd)
\tlibiperf.so.0 => /lib/x86_64-linux-gnu/libiperf.so.0 (0x00007f1)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f3)
"""
    assert parse_ldd(out) == ["/lib/x86_64-linux-gnu/libiperf.so.0",
                              "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"]
    with pytest.raises(InitramfsError, match="libfoo"):
        parse_ldd("\tlibfoo.so.1 => not found\n")


def fake_elf(interp: bytes | None) -> bytes:
    """A 64-bit ELF header plus one program header (PT_INTERP or PT_LOAD)."""
    ident = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    p_type = 3 if interp else 1
    payload = (interp or b"") + b"\0"
    phdr = struct.pack("<IIQQQQQQ", p_type, 4, 120, 0, 0, len(payload), len(payload), 1)
    return header + phdr + payload


def test_elf_interpreter_tells_dynamic_from_static():
    assert elf_interpreter(fake_elf(b"/lib64/ld-linux-x86-64.so.2")) == \
        "/lib64/ld-linux-x86-64.so.2"
    assert elf_interpreter(fake_elf(None)) is None
    with pytest.raises(InitramfsError, match="not a 64-bit"):
        elf_interpreter(b"#!/bin/sh\n" + b"\0" * 60, "script")


def test_dynamic_busybox_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "busybox"
    fake.write_bytes(fake_elf(b"/lib64/ld-linux-x86-64.so.2"))
    monkeypatch.setattr(shutil, "which", lambda name: str(fake))
    with pytest.raises(InitramfsError, match="busybox-static"):
        initramfs.find_busybox()


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox-static not installed")
def test_built_initramfs_has_init_console_and_applets_and_is_cached(tmp_path):
    lines: list[str] = []
    path = initramfs.build_initramfs(cache_dir=tmp_path, log=lines.append)
    assert path.parent == tmp_path / "initramfs" and path.suffix == ".cpio"
    entries = {e.name: e for e in read_newc(path.read_bytes())}
    assert entries["init"].mode == stat.S_IFREG | 0o755
    assert entries["init"].data.decode() == render_init_script()
    assert entries["dev/console"].rdev == (5, 1)
    assert entries["dev/null"].rdev == (1, 3)
    for applet in ("sh", "mount", "ip", "devmem", "base64", "reboot", "setsid", "cttyhack"):
        assert entries[f"bin/{applet}"].data == b"busybox", applet
    assert elf_interpreter(entries["bin/busybox"].data) is None

    mtime = path.stat().st_mtime_ns
    out = tmp_path / "copy.cpio"
    assert initramfs.build_initramfs(out, cache_dir=tmp_path, log=lines.append) == out
    assert path.stat().st_mtime_ns == mtime
    assert out.read_bytes() == path.read_bytes()
    assert len(lines) == 1  # built once, reused once


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox-static not installed")
def test_status_finds_nothing_before_a_build_then_the_archive_built_last(tmp_path, monkeypatch):
    assert initramfs.initramfs_status(cache_dir=tmp_path) is None
    assert initramfs.initramfs_status((), cache_dir=tmp_path) is None
    path = initramfs.build_initramfs(cache_dir=tmp_path, log=lambda line: None)
    assert initramfs.initramfs_status(cache_dir=tmp_path) == path
    assert initramfs.initramfs_status((), cache_dir=tmp_path) == path
    # A changed /init makes the cached archive stale.
    monkeypatch.setattr(initramfs, "render_init_script", lambda: "#!/bin/sh\nreboot -f\n")
    assert initramfs.initramfs_status(cache_dir=tmp_path) is None
