import ipaddress
import os
from pathlib import Path

import pytest

from pymvm.config import (
    DEFAULT_CMDLINE,
    ConfigError,
    NetConfig,
    host_memory_available_mib,
    load_config,
    parse_config,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vm.toml"


def plenty(_hugepages: bool) -> int:
    return 1 << 20


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF" + bytes(60))
    return path


def load(tmp_path: Path, text: str, **kw) -> object:
    path = tmp_path / "vm.toml"
    path.write_text(text)
    kw.setdefault("available_memory_mib", plenty)
    return load_config(path, **kw)


def error_of(tmp_path: Path, text: str, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, **kw)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path / "vm.toml") + ": ")
    return message


MINIMAL = '[boot]\nkernel = "vmlinux"\n'


# -- valid configs --------------------------------------------------------------------------


def test_minimal_config_gets_defaults(tmp_path: Path, kernel: Path) -> None:
    cfg = load(tmp_path, MINIMAL)
    assert cfg.id == "vm"  # the file stem
    assert (cfg.machine.vcpus, cfg.machine.memory_mib, cfg.machine.hugepages) == (1, 256, False)
    assert cfg.boot.kernel == kernel
    assert cfg.boot.initrd is None
    assert cfg.boot.cmdline == DEFAULT_CMDLINE
    assert (cfg.serial.output, cfg.serial.path, cfg.serial.input) == ("stdout", None, True)
    assert cfg.net == ()
    assert cfg.source == tmp_path / "vm.toml"


def test_full_config_parses_every_key(tmp_path: Path, kernel: Path) -> None:
    (tmp_path / "initrd.img").write_bytes(b"070701")
    cfg = load(tmp_path, """
id = "web-1"
[machine]
vcpus = 2
memory_mib = 512
hugepages = false
[boot]
kernel = "vmlinux"
initrd = "initrd.img"
cmdline = "console=ttyS0"
[serial]
output = "file"
path = "console.log"
input = false
[[net]]
id = "net0"
backend = "vhost-net"
tap = "tap0"
bridge = "br0"
netns = "ns1"
mac = "52:54:00:12:34:56"
mtu = 9000
ip = "10.0.0.2/24"
[[net]]
id = "net1"
backend = "vhost-user"
socket = "vu.sock"
socket_mode = "server"
""")
    assert cfg.id == "web-1"
    assert cfg.machine.vcpus == 2 and cfg.machine.memory_mib == 512
    assert cfg.boot.initrd == tmp_path / "initrd.img"
    assert cfg.serial.path == tmp_path / "console.log" and cfg.serial.input is False
    net0, net1 = cfg.net
    assert net0 == NetConfig(
        id="net0", backend="vhost-net", mac="52:54:00:12:34:56", tap="tap0", bridge="br0",
        netns="ns1", mtu=9000, ip=ipaddress.ip_interface("10.0.0.2/24"),
    )
    assert net1.socket == tmp_path / "vu.sock" and net1.socket_mode == "server"


def test_bzimage_kernel_is_accepted(tmp_path: Path) -> None:
    image = bytearray(0x400)
    image[0x202:0x206] = b"HdrS"
    (tmp_path / "bzImage").write_bytes(bytes(image))
    cfg = load(tmp_path, '[boot]\nkernel = "./bzImage"\n')
    assert cfg.boot.kernel == tmp_path / "bzImage"


def test_generated_macs_are_stable_unique_local_unicast(tmp_path: Path, kernel: Path) -> None:
    text = MINIMAL + "[[net]]\n[[net]]\n"
    first = load(tmp_path, text)
    again = load(tmp_path, text)
    macs = [n.mac for n in first.net]
    assert macs == [n.mac for n in again.net]
    assert len(set(macs)) == 2
    for mac in macs:
        octet = int(mac[:2], 16)
        assert octet & 0x02 and not octet & 0x01
    assert [n.id for n in first.net] == ["net0", "net1"]


def test_artifact_names_resolve_through_the_hook(tmp_path: Path, kernel: Path) -> None:
    initrd = tmp_path / "initramfs.cpio.gz"
    initrd.write_bytes(b"x")
    where = {"microvm-kernel": kernel, "test-initramfs": initrd}
    cfg = load(tmp_path, '[boot]\nkernel = "@microvm-kernel"\ninitrd = "@test-initramfs"\n',
               resolve_artifact=where.__getitem__)
    assert (cfg.boot.kernel, cfg.boot.initrd) == (kernel, initrd)


def test_example_config_is_valid(tmp_path: Path, kernel: Path) -> None:
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"x")
    where = {"microvm-kernel": kernel, "test-initramfs": initrd}
    cfg = load_config(EXAMPLE, resolve_artifact=where.__getitem__,
                      available_memory_mib=plenty)
    assert cfg.boot.kernel == kernel
    assert "console=ttyS0" in cfg.boot.cmdline


def test_parse_config_takes_an_already_parsed_dict(tmp_path: Path, kernel: Path) -> None:
    cfg = parse_config({"boot": {"kernel": "vmlinux"}}, tmp_path, "inline.toml",
                       available_memory_mib=plenty)
    assert cfg.id == "inline"


def test_meminfo_reader_reports_mem_available_and_free_hugepages(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 8000000 kB\nMemAvailable: 2097152 kB\n"
                       "HugePages_Total: 64\nHugePages_Free: 10\nHugepagesize: 2048 kB\n")
    assert host_memory_available_mib(False, str(meminfo)) == 2048
    assert host_memory_available_mib(True, str(meminfo)) == 20


# -- one test per error class ---------------------------------------------------------------


def test_wrong_type_names_key_range_and_value(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + '[machine]\nvcpus = "two"\n')
    assert msg.endswith('vm.toml: machine.vcpus: expected an integer from 1 to 64, got "two"')


def test_bool_is_not_accepted_as_integer(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + "[machine]\nvcpus = true\n")
    assert "machine.vcpus: expected an integer from 1 to 64, got true" in msg


def test_out_of_range_integer_is_rejected(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + "[machine]\nvcpus = 65\n")
    assert "machine.vcpus: expected an integer from 1 to 64, got 65" in msg


def test_memory_below_minimum_is_rejected(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + "[machine]\nmemory_mib = 8\n")
    assert "machine.memory_mib: expected an integer >= 16, got 8" in msg


def test_memory_larger_than_host_says_how_much_is_available(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + "[machine]\nmemory_mib = 4096\n",
                   available_memory_mib=lambda huge: 1000)
    assert "machine.memory_mib: 4096 MiB does not fit" in msg
    assert "only 1000 MiB is available" in msg and "lower it" in msg


def test_hugepage_memory_check_uses_free_hugepages(tmp_path: Path, kernel: Path) -> None:
    asked = []

    def available(huge: bool) -> int:
        asked.append(huge)
        return 64

    msg = error_of(tmp_path, MINIMAL + "[machine]\nmemory_mib = 128\nhugepages = true\n",
                   available_memory_mib=available)
    assert asked == [True]
    assert "only 64 MiB of huge pages are free" in msg and "nr_hugepages" in msg


def test_unknown_key_suggests_the_close_match(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + "[machine]\ncpus = 2\n")
    assert msg.endswith("vm.toml: unknown key machine.cpus (did you mean vcpus?)")


def test_unknown_key_without_close_match_lists_known_keys(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, "colour = 1\n" + MINIMAL)
    assert "unknown key colour (known keys: id, machine, boot, serial, net, api, vsock, block)" in msg


def test_unknown_key_in_net_entry_is_indexed(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + "[[net]]\n[[net]]\nmacc = 1\n")
    assert "unknown key net[1].macc (did you mean mac?)" in msg


def test_missing_kernel_file_says_how_to_build_one(tmp_path: Path) -> None:
    msg = error_of(tmp_path, '[boot]\nkernel = "./bzImage"\n')
    assert msg.endswith("boot.kernel: ./bzImage does not exist (build one with "
                        "'pymvm build-kernel')")


def test_missing_kernel_key_is_reported(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "[boot]\n")
    assert "boot.kernel: missing" in msg and "pymvm build-kernel" in msg


def test_missing_boot_table_is_reported(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "[machine]\nvcpus = 1\n")
    assert "missing [boot] table" in msg


def test_kernel_with_unknown_format_names_both_formats(tmp_path: Path) -> None:
    (tmp_path / "kernel.txt").write_text("not a kernel")
    msg = error_of(tmp_path, '[boot]\nkernel = "kernel.txt"\n')
    assert "boot.kernel: kernel.txt is neither an ELF vmlinux" in msg
    assert "nor a bzImage" in msg and "HdrS" in msg


def test_unreadable_kernel_is_reported(
    tmp_path: Path, kernel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel.chmod(0)
    if os.geteuid() == 0:  # root may read anything: pretend the check failed
        real_access = os.access
        monkeypatch.setattr(
            "pymvm.config.os.access",
            lambda p, mode: False if Path(p) == kernel else real_access(p, mode),
        )
    msg = error_of(tmp_path, MINIMAL)
    assert "boot.kernel: vmlinux is not readable (check its permissions)" in msg


def test_kernel_that_is_a_directory_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "kdir").mkdir()
    msg = error_of(tmp_path, '[boot]\nkernel = "kdir"\n')
    assert "boot.kernel: kdir is a directory" in msg


def test_missing_initrd_says_how_to_build_one(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + 'initrd = "nope.cpio"\n')
    assert "boot.initrd: nope.cpio does not exist (build one with 'pymvm build-initramfs')" in msg


def test_artifact_without_resolver_names_the_build_command(tmp_path: Path) -> None:
    msg = error_of(tmp_path, '[boot]\nkernel = "@microvm-kernel"\n')
    assert "boot.kernel:" in msg and "pymvm build-kernel" in msg


def test_artifact_not_built_yet_names_the_build_command(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + 'initrd = "@test-initramfs"\n',
                   resolve_artifact=lambda name: tmp_path / "missing")
    assert "boot.initrd: @test-initramfs has not been built yet (run " \
           "'pymvm build-initramfs')" in msg


def test_unknown_artifact_lists_known_ones(tmp_path: Path) -> None:
    msg = error_of(tmp_path, '[boot]\nkernel = "@big-kernel"\n')
    assert 'boot.kernel: unknown artifact "@big-kernel" (known: @microvm-kernel' in msg


def test_overlong_cmdline_is_rejected(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + f'cmdline = "{"a" * 4096}"\n')
    assert "boot.cmdline: 4096 bytes long; shorten it to at most 4095" in msg


def test_invalid_toml_reports_line_and_column(tmp_path: Path) -> None:
    msg = error_of(tmp_path, '[boot]\nkernel = "x"\nvcpus = = 2\n')
    assert "vm.toml: invalid TOML at line 3, column 9: " in msg
    assert "(at line" not in msg


def test_unreadable_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: no such file") as info:
        load_config(tmp_path / "nope.toml")
    assert "\n" not in str(info.value)


def test_directory_as_config_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_invalid_choice_lists_the_options(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + '[serial]\noutput = "tty"\n')
    assert 'serial.output: expected one of "stdout" | "none" | "file", got "tty"' in msg


def test_serial_file_output_requires_path(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + '[serial]\noutput = "file"\n')
    assert 'serial.path: required when output = "file"' in msg


def test_serial_path_without_file_output_is_rejected(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + '[serial]\npath = "log"\n')
    assert 'serial.path: only used with output = "file"' in msg


def test_serial_input_must_be_bool(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + "[serial]\ninput = 1\n")
    assert "serial.input: expected true or false, got 1" in msg


def test_invalid_vm_id_is_rejected(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, 'id = "my vm"\n' + MINIMAL)
    assert 'id: expected 1-64 characters from A-Z a-z 0-9 _ -, got "my vm"' in msg


def test_file_stem_that_is_no_valid_id_asks_for_id(tmp_path: Path, kernel: Path) -> None:
    path = tmp_path / "my vm.toml"
    path.write_text(MINIMAL)
    with pytest.raises(ConfigError, match="id: not set, and the file name .* set id"):
        load_config(path, available_memory_mib=plenty)


def test_net_as_single_table_is_rejected(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + "[net]\nid = 'a'\n")
    assert "net: expected an array of tables; write [[net]], not [net]" in msg


def test_duplicate_net_id_is_rejected(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + '[[net]]\nid = "a"\n[[net]]\nid = "a"\n')
    assert 'net[1].id: "a" is already used by net[0]; choose a unique id' in msg


def test_duplicate_mac_is_rejected(tmp_path: Path, kernel: Path) -> None:
    mac = 'mac = "52:54:00:00:00:01"\n'
    msg = error_of(tmp_path, MINIMAL + "[[net]]\n" + mac + "[[net]]\n" + mac)
    assert "net[1].mac: " in msg and "already used by net[0]" in msg


def test_multicast_mac_is_rejected(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + '[[net]]\nmac = "01:00:5e:00:00:01"\n')
    assert "net[0].mac: 01:00:5e:00:00:01 is a multicast address; clear the lowest bit" in msg


def test_malformed_mac_is_rejected(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + '[[net]]\nmac = "52-54-00-12-34-56"\n')
    assert 'net[0].mac: expected six hex bytes like "52:54:00:12:34:56"' in msg


def test_long_tap_name_is_rejected(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + '[[net]]\ntap = "a-very-long-tap-name"\n')
    assert "net[0].tap: " in msg and "1-15 characters" in msg


def test_mtu_out_of_range_is_rejected(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + "[[net]]\nmtu = 67\n")
    assert "net[0].mtu: expected an integer from 68 to 65535, got 67" in msg


def test_vhost_user_requires_socket(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + '[[net]]\nbackend = "vhost-user"\n')
    assert 'net[0].socket: required with backend = "vhost-user"' in msg


def test_socket_with_other_backend_is_rejected(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + '[[net]]\nsocket = "x.sock"\n')
    assert 'net[0].socket: only used with backend = "vhost-user"; remove it' in msg


def test_tap_with_vhost_user_is_rejected(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + '[[net]]\nbackend = "vhost-user"\nsocket = "s"\n'
                   'tap = "tap0"\n')
    assert 'net[0].tap: not used with backend = "vhost-user"' in msg


def test_invalid_ip_is_rejected(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + '[[net]]\nip = "10.0.0.300/24"\n')
    assert 'net[0].ip: "10.0.0.300/24" is not an address with prefix length' in msg


def test_multiline_values_do_not_break_the_one_line_rule(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + '[machine]\nvcpus = """\ntwo\n"""\n')
    assert "machine.vcpus" in msg


def test_duplicate_tap_name_is_rejected(tmp_path: Path, kernel: Path) -> None:
    tap = 'tap = "tap0"\n'
    msg = error_of(tmp_path, MINIMAL + "[[net]]\n" + tap + "[[net]]\n" + tap)
    assert 'net[1].tap: "tap0" is already used by net[0]; choose a unique tap' in msg


def test_host_ip_with_vhost_user_is_rejected(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + '[[net]]\nbackend = "vhost-user"\nsocket = "s"\n'
                   'host_ip = "10.0.0.1/24"\n')
    assert 'net[0].host_ip: not used with backend = "vhost-user"' in msg


def test_host_ip_is_accepted_with_the_builtin_backend(tmp_path: Path, kernel: Path) -> None:
    cfg = load(tmp_path, MINIMAL + '[[net]]\nbackend = "builtin"\nhost_ip = "10.0.0.1/24"\n')
    assert cfg.net[0].host_ip == ipaddress.ip_interface("10.0.0.1/24")


@pytest.mark.parametrize("bad", ["\\u0000", "\\n"], ids=["nul", "newline"])
def test_cmdline_with_nul_or_newline_is_rejected(tmp_path: Path, kernel: Path, bad: str) -> None:
    msg = error_of(tmp_path, MINIMAL + f'cmdline = "console=ttyS0{bad}quiet"\n')
    assert "boot.cmdline: contains a NUL or newline; remove it" in msg


def test_api_socket_is_optional_and_relative_to_the_toml(tmp_path: Path, kernel: Path) -> None:
    assert load(tmp_path, MINIMAL).api.socket is None
    cfg = load(tmp_path, MINIMAL + '[api]\nsocket = "vm.sock"\n')
    assert cfg.api.socket == tmp_path / "vm.sock"


def test_api_socket_in_a_missing_directory_names_the_key_and_fix(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + '[api]\nsocket = "nodir/vm.sock"\n')
    assert "api.socket: directory" in msg and "does not exist; create it" in msg


def test_api_socket_that_is_a_directory_is_refused(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + '[api]\nsocket = "."\n')
    assert "api.socket:" in msg and "is a directory" in msg


def test_api_unknown_key_is_an_error(tmp_path: Path, kernel: Path) -> None:
    assert "unknown key api.path" in error_of(tmp_path, MINIMAL + '[api]\npath = "x"\n')
