"""The VM config (pymvm/config.py): what scripts/mutation on the module showed the other config
tests leave unchecked. Mostly the exact one-line error of each bad key (the key named in full,
the problem, the fix), and the values that are stable across releases (generated MACs, the
default vsock CID), the limits exactly at their edges, and /proc/meminfo parsing."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest

from pymvm.config import (
    BlockConfig,
    BootConfig,
    ConfigError,
    MachineConfig,
    NetConfig,
    SerialConfig,
    default_vsock_cid,
    host_memory_available_mib,
    hugepage_size_mib,
    load_config,
)

MINIMAL = '[boot]\nkernel = "vmlinux"\n'
ELF = b"\x7fELF" + bytes(60)


@pytest.fixture
def vm_dir(tmp_path: Path) -> Path:
    (tmp_path / "vmlinux").write_bytes(ELF)
    (tmp_path / "root.img").write_bytes(bytes(1 << 16))
    (tmp_path / "data.img").write_bytes(bytes(1 << 16))
    return tmp_path


def load(vm_dir: Path, text: str, name: str = "vm.toml", available: int | None = 1 << 20):
    path = vm_dir / name
    path.write_text(text)
    return load_config(path, available_memory_mib=lambda hugepages: available)


def error(vm_dir: Path, text: str, **kw) -> str:
    """The ConfigError's message without the config file's path in front."""
    with pytest.raises(ConfigError) as e:
        load(vm_dir, text, **kw)
    message = str(e.value)
    prefix = f"{vm_dir / kw.get('name', 'vm.toml')}: "
    assert message.startswith(prefix), message
    return message[len(prefix):]


DISK = '[[block]]\npath = "root.img"\n'
VU_DISK = '[[block]]\nbackend = "vhost-user"\nsocket = "qsd.sock"\n'
VU_NET = '[[net]]\nbackend = "vhost-user"\nsocket = "vu.sock"\n'

#: (top-level keys, tables after [boot], the error after "FILE: ").
ERRORS = [
    # [[block]]
    ("", '[[block]]\nid = 5\npath = "root.img"\n', "block[0].id: expected a string, got 5"),
    ("", '[[block]]\nid = "a b"\npath = "root.img"\n',
     'block[0].id: expected 1-64 characters from A-Z a-z 0-9 _ -, got "a b"'),
    ("", DISK + "root = 1\n", "block[0].root: expected true or false, got 1"),
    ("", DISK + "serial = 5\n", "block[0].serial: expected a string, got 5"),
    ("", DISK + 'serial = "123456789012345678901"\n',
     'block[0].serial: "123456789012345678901" is not up to 20 printable bytes; shorten it'),
    ("", '[[block]]\nid = "d"\n', ('block[0].path: required with backend = "builtin"; set it to a '
     "raw disk image (e.g. one made by 'pymvm build-rootfs')")),
    ("", "[[block]]\npath = 5\n", "block[0].path: expected a string, got 5"),
    ("", DISK + 'socket = "x.sock"\n', ('block[0].socket: only used with backend = "vhost-user"; '
     'remove it (backend is "builtin")')),
    ("", DISK + 'socket_mode = "client"\n', ('block[0].socket_mode: only used with backend = '
     '"vhost-user"; remove it (backend is "builtin")')),
    ("", '[[block]]\nbackend = "vhost-user"\n', ('block[0].socket: required with backend = '
     '"vhost-user"; set it to the vhost-user-blk back-end\'s unix socket path')),
    ("", '[[block]]\nbackend = "vhost-user"\nsocket = 5\n',
     "block[0].socket: expected a string, got 5"),
    ("", VU_DISK + 'socket_mode = "both"\n',
     'block[0].socket_mode: expected one of "client" | "server", got "both"'),
    ("", VU_DISK + 'path = "root.img"\n', ('block[0].path: not used with backend = "vhost-user" '
     "(the back-end owns the image); remove it")),
    ("", VU_DISK + 'serial = "abc"\n', ('block[0].serial: only used with backend = "builtin" (the '
     "vhost-user back-end answers GET_ID); remove it")),
    ('block = 5\n', "", "block: expected an array of tables ([[block]]), got 5"),
    ("", '[block]\npath = "root.img"\n',
     "block: expected an array of tables; write [[block]], not [block]"),
    ("", DISK + 'id = "d"\nread_only = true\n' + DISK + 'id = "d"\nread_only = true\n',
     'block[1].id: "d" is already used by block[0]; choose a unique id'),
    ("", DISK + 'id = "a"\nread_only = true\n' + DISK + 'id = "b"\n',
     ("block[1].path: {dir}/root.img is already block[0]'s image; one image serves one "
     "writable disk")),
    ("", DISK + 'id = "a"\nroot = true\n[[block]]\npath = "data.img"\nroot = true\n',
     "block[1].root: block[0] is already the root disk; set root = true on one disk only"),
    # [[net]]
    ("", "[[net]]\nid = 5\n", "net[0].id: expected a string, got 5"),
    ("", '[[net]]\nid = "a b"\n', ('net[0].id: expected 1-64 characters from A-Z a-z 0-9 _ -, '
     'got "a b"')),
    ("", '[[net]]\nbackend = "tap"\n',
     'net[0].backend: expected one of "vhost-net" | "vhost-user" | "builtin", got "tap"'),
    ("", "[[net]]\nnetns = 5\n", "net[0].netns: expected a string, got 5"),
    *[("", f'[[net]]\nnetns = "{ns}"\n', (f'net[0].netns: "{shown}" is not a namespace name; use '
       "a name as shown by 'ip netns list'"))
      for ns, shown in [("", ""), ("a/b", "a/b"), (".", "."), ("..", ".."),
                        ("a\\u0000b", "a\\u0000b")]],
    ("", '[[net]]\nbackend = "vhost-user"\nsocket = 5\n', "net[0].socket: expected a string, got 5"),
    ("", VU_NET + "socket_mode = 5\n",
     'net[0].socket_mode: expected one of "client" | "server", got 5'),
    ("", '[[net]]\nbackend = "vhost-user"\n', ('net[0].socket: required with backend = '
     "\"vhost-user\"; set it to the back-end's unix socket path")),
    *[("", VU_NET + f'{key} = "x0"\n', (f'net[0].{key}: not used with backend = "vhost-user" (the '
       "vhost-user back-end owns the host side); remove it")) for key in ("tap", "bridge", "netns")],
    *[("", f'[[net]]\n{key} = "{value}"\n', (f'net[0].{key}: only used with backend = "vhost-user"; '
       'remove it (backend is "vhost-net")'))
      for key, value in (("socket", "x.sock"), ("socket_mode", "client"))],
    ("", '[[net]]\nip = "x"\n', ('net[0].ip: "x" is not an address with prefix length; write it '
     'like "10.0.0.2/24"')),
    ("", '[[net]]\nhost_ip = "x"\n', ('net[0].host_ip: "x" is not an address with prefix length; '
     'write it like "10.0.0.1/24"')),
    ("", "[[net]]\nip = 5\n", "net[0].ip: expected a string, got 5"),
    ("", VU_NET + 'host_ip = "10.0.0.1/24"\n', ('net[0].host_ip: not used with backend = '
     '"vhost-user" (the vhost-user back-end owns the host side); remove it')),
    ("net = 5\n", "", "net: expected an array of tables ([[net]]), got 5"),
    ("", "[[net]]\nmac = 5\n", "net[0].mac: expected a string, got 5"),
    ("", '[[net]]\nmac = "52:54:00"\n',
     'net[0].mac: expected six hex bytes like "52:54:00:12:34:56", got "52:54:00"'),
    ("", '[[net]]\nmac = "00:00:00:00:00:00"\n',
     "net[0].mac: 00:00:00:00:00:00 is not usable; choose another"),
    ("", "[[net]]\ntap = 5\n", "net[0].tap: expected a string, got 5"),
    *[("", f'[[net]]\ntap = "{name}"\n', (f'net[0].tap: "{name}" is not a valid interface name; '
       "use 1-15 characters without '/', ':' or spaces"))
      for name in ("", "a/b", ".", "..", "a b", "a234567890123456")],
    # [serial], [api], [boot], [machine], the top level
    ("", "[serial]\nbogus = 1\n", "unknown key serial.bogus (known keys: output, path, input)"),
    ("", '[serial]\noutput = "file"\npath = 5\n', "serial.path: expected a string, got 5"),
    ("", '[serial]\noutput = "file"\n', ('serial.path: required when output = "file"; set it to '
     "the log file's path")),
    ("", '[serial]\noutput = "file"\npath = "nodir/log"\n',
     "serial.path: directory {dir}/nodir does not exist; create it or choose another path"),
    ("", '[serial]\noutput = "file"\npath = "."\n', "serial.path: . is a directory; name a file"),
    ("", '[serial]\noutput = "none"\npath = "log"\n', ('serial.path: only used with output = '
     '"file"; remove it or set output = "file" (output is "none")')),
    ("", "[api]\nsocket = 5\n", "api.socket: expected a string, got 5"),
    ("", '[api]\nsocket = ""\n', ('api.socket: "" is a directory; name the socket file to create, '
     'e.g. "/run/pymvm/vm1.sock"')),
    ("", '[api]\nsocket = "nodir/api.sock"\n',
     "api.socket: directory {dir}/nodir does not exist; create it or choose another path"),
    ("api = 5\n", "", "api: expected a table ([api]), got 5"),
    ("vsock = 5\n", "", "vsock: expected a table ([vsock]), got 5"),
    ("machine = 5\n", "", "machine: expected a table ([machine]), got 5"),
    ("serial = 5\n", "", "serial: expected a table ([serial]), got 5"),
    ("id = 5\n", "", "id: expected a string, got 5"),
    ("", "[machine]\nhugepages = 1\n", "machine.hugepages: expected true or false, got 1"),
    ("", "acpi = 5\n", 'boot.acpi: expected "auto", true or false, got 5'),
    ("", "cmdline = 5\n", "boot.cmdline: expected a string, got 5"),
    ("", "initrd = 5\n", "boot.initrd: expected a string, got 5"),
    ("", 'initrd = ""\n', "boot.initrd: is empty; set it to a file path"),
    ("", "bogus = 1\n", "unknown key boot.bogus (known keys: kernel, initrd, cmdline, acpi)"),
    ("", 'initrd = "@nothing"\n',
     'boot.initrd: unknown artifact "@nothing" (known: @microvm-kernel, @test-initramfs)'),
    ("", 'initrd = "@test-initramfs"\n', ("boot.initrd: @test-initramfs is only known to the pymvm "
     "CLI (build it with 'pymvm build-initramfs', then start the VM with 'pymvm run')")),
]


@pytest.mark.parametrize(("top", "tables", "expected"), ERRORS)
def test_each_bad_key_is_one_line_naming_the_key_the_problem_and_the_fix(
        vm_dir: Path, top: str, tables: str, expected: str) -> None:
    # a [boot] key ("acpi = 5") follows kernel = ... and so is in [boot]
    assert error(vm_dir, top + MINIMAL + tables) == expected.replace("{dir}", str(vm_dir))


# ---- limits exactly at their edges -----------------------------------------------------------


def test_the_smallest_and_largest_values_of_each_limit_are_accepted(vm_dir: Path) -> None:
    assert load(vm_dir, "[machine]\nvcpus = 1\n" + MINIMAL).machine.vcpus == 1
    assert load(vm_dir, "[machine]\nvcpus = 64\n" + MINIMAL).machine.vcpus == 64
    assert load(vm_dir, MINIMAL + DISK + 'serial = "12345678901234567890"\n').block[0].serial == \
        "12345678901234567890"
    cmdline = "x" * 4095
    assert load(vm_dir, MINIMAL + f'cmdline = "{cmdline}"\n').boot.cmdline == cmdline
    for tap in ("t", "t23456789012345"):
        assert load(vm_dir, MINIMAL + f'[[net]]\ntap = "{tap}"\n').net[0].tap == tap


def test_memory_exactly_as_large_as_what_is_available_fits(vm_dir: Path) -> None:
    cfg = load(vm_dir, "[machine]\nmemory_mib = 300\n" + MINIMAL, available=300)
    assert cfg.machine.memory_mib == 300
    assert error(vm_dir, "[machine]\nmemory_mib = 301\n" + MINIMAL, available=300) == (
        "machine.memory_mib: 301 MiB does not fit: only 300 MiB is available on this host; "
        "lower it")


def test_huge_page_backed_memory_is_a_whole_number_of_free_huge_pages(vm_dir: Path,
                                                                       monkeypatch) -> None:
    import pymvm.config

    monkeypatch.setattr(pymvm.config, "hugepage_size_mib", lambda: 2)
    cfg = load(vm_dir, "[machine]\nmemory_mib = 256\nhugepages = true\n" + MINIMAL)
    assert cfg.machine.hugepages is True
    assert error(vm_dir, "[machine]\nmemory_mib = 255\nhugepages = true\n" + MINIMAL) == (
        "machine.memory_mib: 255 is not a multiple of the 2 MiB huge page size; round it to one")
    assert error(vm_dir, "[machine]\nmemory_mib = 256\nhugepages = true\n" + MINIMAL,
                 available=100) == (
        "machine.memory_mib: 256 MiB does not fit: only 100 MiB of huge pages are free; lower it "
        "or reserve more with 'echo N > /proc/sys/vm/nr_hugepages'")


def test_an_api_socket_path_may_be_107_bytes_not_108(vm_dir: Path) -> None:
    base = str(vm_dir) + "/"
    fits = base + "s" * (107 - len(base))
    assert str(load(vm_dir, MINIMAL + f'[api]\nsocket = "{fits}"\n').api.socket) == fits
    assert error(vm_dir, MINIMAL + f'[api]\nsocket = "{fits}x"\n') == (
        f"api.socket: {fits}x is longer than a UNIX socket path may be (107 bytes); choose a "
        "shorter path")


# ---- how values are shown in errors ----------------------------------------------------------


@pytest.mark.parametrize(("toml", "shown"), [
    ("false", "false"), ("true", "true"), ("{}", "a table"), ("[]", "an array"),
    ('"é"', '"é"'), ('"a\\nb"', '"a\\nb"'),  # a newline shown escaped
    ('"' + "x" * 58 + '"', '"' + "x" * 58 + '"'),  # 60 characters shown whole
    ('"' + "x" * 59 + '"', '"' + "x" * 56 + "..."),  # 61: cut to 57 and "..."
])
def test_a_bad_value_is_shown_as_toml_spells_it_on_one_short_line(vm_dir: Path, toml: str,
                                                                  shown: str) -> None:
    assert error(vm_dir, f"[machine]\nvcpus = {toml}\n" + MINIMAL) == (
        f"machine.vcpus: expected an integer from 1 to 64, got {shown}")


def test_a_config_named_by_a_path_with_newlines_or_double_spaces_gets_a_one_line_error(
        tmp_path: Path) -> None:
    path = tmp_path / "two  spaces\nand a newline.toml"
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == (f"{tmp_path}/two  spaces and a newline.toml: no such file (pass the "
                            "path of a VM config such as examples/vm.toml)")


def test_a_file_name_that_is_no_valid_id_needs_an_id(vm_dir: Path) -> None:
    assert error(vm_dir, MINIMAL, name="my vm.toml") == (
        'id: not set, and the file name "my vm" is not a valid id; set id to 1-64 characters '
        "from A-Z a-z 0-9 _ -")


# ---- the file itself -------------------------------------------------------------------------


def test_toml_syntax_errors_name_the_line_and_column_or_the_end(vm_dir: Path) -> None:
    assert error(vm_dir, MINIMAL + "a = 1\nb = \n") == ("invalid TOML at line 4, column 5: "
                                                        "Invalid value")
    assert error(vm_dir, MINIMAL + 'a = "x') == "invalid TOML at end of document: Unterminated string"


def test_values_nested_too_deeply_are_refused_in_one_line(vm_dir: Path) -> None:
    assert error(vm_dir, "a = " + "[" * 5000 + "]" * 5000 + "\n" + MINIMAL) == (
        "arrays or inline tables nested too deeply for the TOML parser; a VM config needs at most "
        "a few levels: flatten the value")


def test_a_config_that_is_not_utf8_names_the_byte(vm_dir: Path) -> None:
    path = vm_dir / "vm.toml"
    path.write_bytes(b'id = "a\xff"\n')
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: not UTF-8 text (byte 7); save it as UTF-8"


def unix_socket_file(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    return s


def test_a_config_or_kernel_that_cannot_be_opened_names_the_reason(vm_dir: Path) -> None:
    config = vm_dir / "sock.toml"
    with unix_socket_file(config):
        with pytest.raises(ConfigError) as e:
            load_config(config)
        assert str(e.value) == (f"{config}: cannot be read: No such device or address (check its "
                                "permissions)")
    with unix_socket_file(vm_dir / "kernel.sock"):
        assert error(vm_dir, '[boot]\nkernel = "kernel.sock"\n') == (
            "boot.kernel: kernel.sock cannot be read: No such device or address (check its "
            "permissions)")


def test_a_bzimage_is_recognised_by_its_header(vm_dir: Path) -> None:
    image = bytearray(0x300)
    image[0x202:0x206] = b"HdrS"
    (vm_dir / "bzImage").write_bytes(bytes(image))
    assert load(vm_dir, '[boot]\nkernel = "bzImage"\n').boot.kernel == vm_dir / "bzImage"
    (vm_dir / "junk").write_bytes(bytes(0x300))
    assert error(vm_dir, '[boot]\nkernel = "junk"\n') == (
        'boot.kernel: junk is neither an ELF vmlinux (no \\x7fELF magic) nor a bzImage (no "HdrS" '
        "at offset 0x202); point it at vmlinux or arch/x86/boot/bzImage")


def test_a_path_under_the_home_of_a_user_that_does_not_exist_is_refused(vm_dir: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load(vm_dir, '[boot]\nkernel = "~nosuchuser-pymvm/dir/vmlinux"\n')
    assert str(e.value) == (f'{vm_dir / "vm.toml"}: path "~nosuchuser-pymvm/dir/vmlinux": '
                            "~nosuchuser-pymvm names no user on this host (and ~ no home "
                            "directory); write the full path")


# ---- values stable across releases -----------------------------------------------------------


def test_a_vms_default_vsock_cid_is_the_same_in_every_release() -> None:
    assert default_vsock_cid("vm1") == 2985480249  # a guest's agent config may name it
    assert default_vsock_cid("vm2") != default_vsock_cid("vm1")


def test_generated_macs_are_the_same_in_every_release_and_per_nic(vm_dir: Path) -> None:
    two = MINIMAL + "[[net]]\n[[net]]\n"
    cfg = load(vm_dir, 'id = "vm1"\n' + two)
    assert [n.mac for n in cfg.net] == ["1e:fc:87:68:9c:e7", "82:db:fd:59:30:2b"]
    assert load(vm_dir, 'id = "vm2"\n' + two).net[0].mac == "be:5f:c8:c6:d9:8f"
    # a NIC keeps its MAC when another NIC's changes
    other = load(vm_dir, 'id = "vm1"\n' + MINIMAL + '[[net]]\nmac = "52:54:00:00:00:01"\n[[net]]\n')
    assert other.net[1].mac == "82:db:fd:59:30:2b"


def test_a_mac_is_read_as_hex_and_kept_in_lower_case(vm_dir: Path) -> None:
    cfg = load(vm_dir, MINIMAL + '[[net]]\nmac = "5A:54:00:AB:CD:EF"\n')
    assert cfg.net[0].mac == "5a:54:00:ab:cd:ef"


# ---- /proc/meminfo ---------------------------------------------------------------------------


def meminfo(tmp_path: Path, text: str) -> str:
    path = tmp_path / "meminfo"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(("text", "size"), [
    ("MemTotal: 100 kB\nHugepagesize:    2048 kB\n", 2),
    ("Hugepagesize: 1048576 kB\n", 1024),
    ("Hugepagesize: 1536 kB\n", 1),  # whole MiB, rounded down
    ("Hugepagesize: 512 kB\n", 1),  # at least 1
    ("hugepagesize: 1048576 kB\n", 2),  # not the field: the 2 MiB default
    ("MemTotal: 100 kB\n", 2),
])
def test_the_huge_page_size_is_read_from_meminfo_in_whole_mib(tmp_path: Path, text: str,
                                                              size: int) -> None:
    assert hugepage_size_mib(meminfo(tmp_path, text)) == size


def test_available_memory_is_read_from_meminfo_in_whole_mib(tmp_path: Path) -> None:
    text = ("MemTotal:       16000000 kB\nEmpty:\nMemAvailable:       1500 kB\n"
            "HugePages_Free:        3\nHugepagesize:       1536 kB\n")
    path = meminfo(tmp_path, text)
    assert host_memory_available_mib(False, path) == 1
    assert host_memory_available_mib(True, path) == 4  # 3 x 1536 kB = 4.5 MiB
    only_free = meminfo(tmp_path, "HugePages_Free: 3\n")
    assert host_memory_available_mib(True, only_free) is None
    assert host_memory_available_mib(False, only_free) is None


def test_a_boot_that_is_no_table_or_has_no_kernel_is_refused_naming_the_fix(vm_dir: Path) -> None:
    assert error(vm_dir, "boot = 5\n") == "boot: expected a table ([boot]), got 5"
    assert error(vm_dir, '[boot]\ncmdline = "x"\n') == (
        'boot.kernel: missing; set it to a vmlinux or bzImage path, or "@microvm-kernel" after '
        "'pymvm build-kernel'")


def test_only_a_disk_that_says_so_is_the_root_disk(vm_dir: Path) -> None:
    assert load(vm_dir, MINIMAL + DISK).block[0].root is False


def test_available_memory_is_read_from_this_hosts_meminfo_by_default() -> None:
    mib = host_memory_available_mib(False)
    assert isinstance(mib, int) and mib > 0


def test_a_nic_keeps_every_configured_value_in_its_field(vm_dir: Path) -> None:
    # Read field by field: comparing with a NetConfig built by the same __init__ would not
    # notice a constructor that drops a value.
    net = load(vm_dir, MINIMAL + """[[net]]
id = "uplink"
backend = "vhost-user"
socket = "vu.sock"
socket_mode = "server"
swappable = true
tap = "tap7"
bridge = "br7"
netns = "ns7"
mac = "52:54:00:ab:cd:ef"
mtu = 9000
ip = "10.1.2.3/24"
host_ip = "10.1.2.1/24"
""").net[0]
    assert {name: getattr(net, name) for name in NetConfig.__slots__} == {
        "id": "uplink", "backend": "vhost-user", "mac": "52:54:00:ab:cd:ef", "tap": "tap7",
        "bridge": "br7", "netns": "ns7", "mtu": 9000, "socket": vm_dir / "vu.sock",
        "socket_mode": "server", "ip": ipaddress.ip_interface("10.1.2.3/24"),
        "host_ip": ipaddress.ip_interface("10.1.2.1/24"), "swappable": True}


def test_the_config_records_defaults_are_the_toml_defaults(vm_dir: Path) -> None:
    # The parser passes every field; the constructors' defaults serve code that builds a
    # config by hand and must give what a file that leaves the keys out gives.
    cfg = load(vm_dir, MINIMAL + DISK)
    assert MachineConfig() == cfg.machine
    assert BootConfig(cfg.boot.kernel) == cfg.boot
    assert SerialConfig() == cfg.serial
    disk = cfg.block[0]
    assert BlockConfig(disk.id, "builtin", disk.path) == disk
