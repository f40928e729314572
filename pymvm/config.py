"""A VM's TOML config -> frozen, validated records (schema: docs/config.md).

Every error is a ConfigError with one line naming the file, the dotted key and the fix:
    vm.toml: machine.vcpus: expected an integer from 1 to 64, got "two"
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from .record import FrozenRecord

MAX_VCPUS = 64
MIN_MEMORY_MIB = 16
CMDLINE_MAX_LEN = 4095  # bytes, without the terminating NUL
DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=-1"
IFNAMSIZ = 16  # includes the NUL: names are at most 15 characters
VSOCK_CID_MIN = 3  # 0-2: hypervisor, loopback, host (virtio 1.2 5.10.4)
VSOCK_CID_MAX = 0xFFFF_FFFE  # a 32-bit CID; 0xFFFFFFFF is VMADDR_CID_ANY
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MAC_RE = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")

# "@name" artifacts accepted for boot.kernel / boot.initrd, and the command that builds each.
ARTIFACT_BUILD_COMMANDS = {
    "microvm-kernel": "pymvm build-kernel",
    "test-initramfs": "pymvm build-initramfs",
}

SerialOutput = Literal["stdout", "none", "file"]
NetBackend = Literal["vhost-net", "vhost-user", "builtin"]
SocketMode = Literal["client", "server"]


class ConfigError(Exception):
    """The config is invalid; the message is one line naming file, key and fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split("\n")))


class MachineConfig(FrozenRecord):
    """[machine]: vCPUs, guest RAM and its backing."""

    __slots__ = ("vcpus", "memory_mib", "hugepages")
    vcpus: int
    memory_mib: int
    hugepages: bool

    def __init__(self, vcpus: int = 1, memory_mib: int = 256, hugepages: bool = False) -> None:
        self._init(vcpus, memory_mib, hugepages)


class BootConfig(FrozenRecord):
    """[boot]: kernel, initrd, command line and ACPI."""

    __slots__ = ("kernel", "initrd", "cmdline", "acpi")
    kernel: Path
    initrd: Path | None
    cmdline: str
    acpi: bool | Literal["auto"]  # resolved by pymvm.boot.acpi.resolve_acpi

    def __init__(self, kernel: Path, initrd: Path | None = None, cmdline: str = DEFAULT_CMDLINE,
                 acpi: bool | Literal["auto"] = "auto") -> None:
        self._init(kernel, initrd, cmdline, acpi)


class SerialConfig(FrozenRecord):
    """[serial]: where the guest's console goes and whether stdin feeds it."""

    __slots__ = ("output", "path", "input")
    output: SerialOutput
    path: Path | None
    input: bool

    def __init__(self, output: SerialOutput = "stdout", path: Path | None = None,
                 input: bool = True) -> None:
        self._init(output, path, input)


class NetConfig(FrozenRecord):
    """One [[net]] NIC: its back-end, host side and guest MAC."""

    __slots__ = ("id", "backend", "mac", "tap", "bridge", "netns", "mtu", "socket", "socket_mode",
                 "ip", "host_ip", "swappable")
    id: str
    backend: NetBackend
    mac: str  # lower-case "52:54:00:12:34:56"; generated when not configured
    tap: str | None
    bridge: str | None
    netns: str | None
    mtu: int | None
    socket: Path | None
    socket_mode: SocketMode
    ip: ipaddress.IPv4Interface | ipaddress.IPv6Interface | None
    host_ip: ipaddress.IPv4Interface | ipaddress.IPv6Interface | None
    #: May move to any back-end kind while running: offered only what all kinds implement.
    swappable: bool

    def __init__(self, id: str, backend: NetBackend, mac: str, tap: str | None = None,
                 bridge: str | None = None, netns: str | None = None, mtu: int | None = None,
                 socket: Path | None = None, socket_mode: SocketMode = "client",
                 ip: ipaddress.IPv4Interface | ipaddress.IPv6Interface | None = None,
                 host_ip: ipaddress.IPv4Interface | ipaddress.IPv6Interface | None = None,
                 swappable: bool = False) -> None:
        self._init(id, backend, mac, tap, bridge, netns, mtu, socket, socket_mode, ip, host_ip,
                   swappable)


BlockBackend = Literal["builtin", "vhost-user"]


class BlockConfig(FrozenRecord):
    """A [[block]] disk: a virtio-blk device served by a vhost-user-blk back-end."""

    __slots__ = ("id", "backend", "path", "socket", "socket_mode", "read_only", "root", "serial")
    id: str
    backend: BlockBackend
    path: Path | None  # the raw image (builtin)
    socket: Path | None  # the back-end's socket (vhost-user)
    socket_mode: SocketMode
    read_only: bool
    root: bool  # adds root=/dev/vdX to the command line
    serial: str  # what GET_ID answers (builtin; at most 20 bytes)

    def __init__(self, id: str, backend: BlockBackend, path: Path | None = None,
                 socket: Path | None = None, socket_mode: SocketMode = "client",
                 read_only: bool = False, root: bool = False, serial: str = "") -> None:
        self._init(id, backend, path, socket, socket_mode, read_only, root, serial)


class ApiConfig(FrozenRecord):
    """[api]: the control API's socket."""

    __slots__ = ("socket",)
    socket: Path | None  # the control API's UNIX socket; None: no API

    def __init__(self, socket: Path | None = None) -> None:
        self._init(socket)


class VsockConfig(FrozenRecord):
    """[vsock]: the guest's virtio-vsock device."""

    __slots__ = ("cid",)
    cid: int  # the guest's context id (3 .. 2**32-2); derived from the VM id when not set

    def __init__(self, cid: int) -> None:
        self._init(cid)


class VmConfig(FrozenRecord):
    """A whole VM's configuration, as validated from its TOML file."""

    __slots__ = ("id", "machine", "boot", "serial", "net", "source", "api", "vsock", "block")
    id: str
    machine: MachineConfig
    boot: BootConfig
    serial: SerialConfig
    net: tuple[NetConfig, ...]
    source: Path
    api: ApiConfig
    vsock: VsockConfig | None  # [vsock]: a virtio-vsock device on vhost-vsock
    block: tuple[BlockConfig, ...]  # [[block]]: virtio-blk disks

    def __init__(self, id: str, machine: MachineConfig, boot: BootConfig, serial: SerialConfig,
                 net: tuple[NetConfig, ...], source: Path, api: ApiConfig = ApiConfig(),
                 vsock: VsockConfig | None = None, block: tuple[BlockConfig, ...] = ()) -> None:
        self._init(id, machine, boot, serial, net, source, api, vsock, block)


def default_resolve_artifact(name: str) -> Path:
    """Resolver used when the caller has none: "@name" artifacts need the CLI's resolver."""
    command = ARTIFACT_BUILD_COMMANDS[name]
    raise ConfigError(
        f"@{name} is only known to the pymvm CLI (build it with '{command}', then start the VM "
        "with 'pymvm run')"
    )


def host_memory_available_mib(hugepages: bool, meminfo: str = "/proc/meminfo") -> int | None:
    """MemAvailable, or free huge pages times their size, in MiB; None if unknown."""
    try:
        with open(meminfo, encoding="ascii") as f:
            text = f.read()
    except OSError:
        return None
    fields: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[name] = int(parts[0])  # kB, except HugePages_* (page counts)
    if hugepages:
        if "HugePages_Free" not in fields or "Hugepagesize" not in fields:
            return None
        return fields["HugePages_Free"] * fields["Hugepagesize"] // 1024
    if "MemAvailable" not in fields:
        return None
    return fields["MemAvailable"] // 1024


def hugepage_size_mib(meminfo: str = "/proc/meminfo") -> int:
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("Hugepagesize:"):
                    return max(1, int(line.split()[1]) // 1024)
    except (OSError, ValueError, IndexError):
        pass
    return 2


def load_config(
    path: str | os.PathLike[str],
    *,
    resolve_artifact: Callable[[str], Path] = default_resolve_artifact,
    available_memory_mib: Callable[[bool], int | None] = host_memory_available_mib,
) -> VmConfig:
    """Read and validate a VM config file; raises ConfigError."""
    path = Path(path)
    source = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{source}: no such file (pass the path of a VM config such as examples/vm.toml)"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a directory (pass the path of a .toml file)") from None
    except OSError as exc:
        raise ConfigError(
            f"{source}: cannot be read: {exc.strerror} (check its permissions)"
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{source}: not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from None
    too_deep = ConfigError(
        f"{source}: arrays or inline tables nested too deeply for the TOML parser; "
        f"a VM config needs at most a few levels: flatten the value"
    )
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: {_describe_toml_error(exc)}") from None
    except RecursionError:  # tomllib recurses once per nesting level
        raise too_deep from None
    try:
        return parse_config(
            data,
            path.parent,
            source,
            resolve_artifact=resolve_artifact,
            available_memory_mib=available_memory_mib,
        )
    except RecursionError:  # a deep value that parsed, then was compared or printed
        raise too_deep from None


def _describe_toml_error(exc: tomllib.TOMLDecodeError) -> str:
    # Python 3.11's TOMLDecodeError has no lineno attribute; the position ends the message.
    message = str(exc)
    m = re.search(r"^(.*?)\s*\(at line (\d+), column (\d+)\)$", message)
    if m:
        return f"invalid TOML at line {m[2]}, column {m[3]}: {m[1]}"
    m = re.search(r"^(.*?)\s*\(at end of document\)$", message)
    if m:
        return f"invalid TOML at end of document: {m[1]}"
    return f"invalid TOML: {message}"


def parse_config(
    data: Mapping[str, Any],
    base_dir: Path,
    source: str,
    *,
    resolve_artifact: Callable[[str], Path] = default_resolve_artifact,
    available_memory_mib: Callable[[bool], int | None] = host_memory_available_mib,
) -> VmConfig:
    """Validate an already-parsed TOML document; relative paths resolve against base_dir."""
    p = _Parser(source, Path(base_dir), resolve_artifact, available_memory_mib)
    return p.vm(data)


def _show(value: Any) -> str:
    """A value as TOML would spell it, on one line and short."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, dict):
        text = "a table"
    elif isinstance(value, list):
        text = "an array"
    else:
        text = str(value)
    text = text.replace("\n", "\\n")
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Parser:
    def __init__(
        self,
        source: str,
        base_dir: Path,
        resolve_artifact: Callable[[str], Path],
        available_memory_mib: Callable[[bool], int | None],
    ) -> None:
        self.source = source
        self.base_dir = base_dir
        self.resolve_artifact = resolve_artifact
        self.available_memory_mib = available_memory_mib

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {problem}")

    # -- generic checks --------------------------------------------------------------------

    def check_keys(self, table: Mapping[str, Any], allowed: tuple[str, ...], prefix: str) -> None:
        for key in table:
            if key in allowed:
                continue
            dotted = f"{prefix}{key}"
            import difflib  # only for a bad key: not on every start (issue 15)

            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(allowed)}"
            raise ConfigError(f"{self.source}: unknown key {dotted} ({hint})")

    def table(self, data: Mapping[str, Any], key: str, dotted: str) -> Mapping[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            raise self.error(dotted, f"expected a table ([{dotted}]), got {_show(value)}")
        return value

    def integer(self, table: Mapping[str, Any], key: str, dotted: str, default: int | None,
                lo: int, hi: int | None = None) -> int | None:
        if key not in table:
            return default
        value = table[key]
        if not _is_int(value) or value < lo or (hi is not None and value > hi):
            want = f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}"
            raise self.error(dotted, f"expected {want}, got {_show(value)}")
        return value

    def boolean(self, table: Mapping[str, Any], key: str, dotted: str, default: bool) -> bool:
        value = table.get(key, default)
        if not isinstance(value, bool):
            raise self.error(dotted, f"expected true or false, got {_show(value)}")
        return value

    def string(self, table: Mapping[str, Any], key: str, dotted: str,
               default: str | None) -> str | None:
        if key not in table:
            return default
        value = table[key]
        if not isinstance(value, str):
            raise self.error(dotted, f"expected a string, got {_show(value)}")
        return value

    def choice(self, table: Mapping[str, Any], key: str, dotted: str, default: str,
               choices: tuple[str, ...]) -> str:
        value = table.get(key, default)
        if value not in choices or not isinstance(value, str):
            options = " | ".join(json.dumps(c) for c in choices)
            raise self.error(dotted, f"expected one of {options}, got {_show(value)}")
        return value

    def path(self, value: str) -> Path:
        try:
            path = Path(value).expanduser()
        except RuntimeError:  # "~name/..." for a user this host does not have (found by bench/fuzz)
            user = value[1:].split("/", 1)[0]
            raise ConfigError(f"{self.source}: path {_show(value)}: ~{user} names no user on this "
                              f"host (and ~ no home directory); write the full path") from None
        return path if path.is_absolute() else self.base_dir / path

    # -- sections ---------------------------------------------------------------------------

    def vm(self, data: Mapping[str, Any]) -> VmConfig:
        self.check_keys(data, ("id", "machine", "boot", "serial", "net", "api", "vsock",
                               "block"), "")
        vm_id = self.string(data, "id", "id", None)
        if vm_id is None:
            vm_id = Path(self.source).stem
            if not _ID_RE.fullmatch(vm_id):
                raise self.error(
                    "id", f"not set, and the file name {_show(vm_id)} is not a valid id; "
                    "set id to 1-64 characters from A-Z a-z 0-9 _ -")
        elif not _ID_RE.fullmatch(vm_id):
            raise self.error(
                "id", f"expected 1-64 characters from A-Z a-z 0-9 _ -, got {_show(vm_id)}")
        if "boot" not in data:
            raise ConfigError(
                f"{self.source}: missing [boot] table (add [boot] with kernel = \"...\")")
        machine = self.machine(self.table(data, "machine", "machine"))
        boot = self.boot(self.table(data, "boot", "boot"))
        serial = self.serial(self.table(data, "serial", "serial"))
        net = self.net(data.get("net", []), vm_id)
        api = self.api(self.table(data, "api", "api"))
        vsock = self.vsock(self.table(data, "vsock", "vsock"), vm_id) if "vsock" in data else None
        block = self.block(data.get("block", []))
        return VmConfig(vm_id, machine, boot, serial, net, Path(self.source), api, vsock, block)

    def machine(self, t: Mapping[str, Any]) -> MachineConfig:
        self.check_keys(t, ("vcpus", "memory_mib", "hugepages"), "machine.")
        vcpus = self.integer(t, "vcpus", "machine.vcpus", 1, 1, MAX_VCPUS)
        memory = self.integer(t, "memory_mib", "machine.memory_mib", 256, MIN_MEMORY_MIB)
        hugepages = self.boolean(t, "hugepages", "machine.hugepages", False)
        assert vcpus is not None and memory is not None
        if hugepages:
            page = hugepage_size_mib()
            if memory % page:
                raise self.error("machine.memory_mib", f"{memory} is not a multiple of the "
                                 f"{page} MiB huge page size; round it to one")
        available = self.available_memory_mib(hugepages)
        if available is not None and memory > available:
            if hugepages:
                fix = (f"only {available} MiB of huge pages are free; lower it or reserve more "
                       "with 'echo N > /proc/sys/vm/nr_hugepages'")
            else:
                fix = f"only {available} MiB is available on this host; lower it"
            raise self.error("machine.memory_mib", f"{memory} MiB does not fit: {fix}")
        return MachineConfig(vcpus, memory, hugepages)

    def boot(self, t: Mapping[str, Any]) -> BootConfig:
        self.check_keys(t, ("kernel", "initrd", "cmdline", "acpi"), "boot.")
        if "kernel" not in t:
            raise self.error("boot.kernel", "missing; set it to a vmlinux or bzImage path, "
                             "or \"@microvm-kernel\" after 'pymvm build-kernel'")
        kernel = self.boot_file(t, "kernel", "pymvm build-kernel")
        assert kernel is not None
        self.check_kernel_format(kernel, t["kernel"])
        initrd = self.boot_file(t, "initrd", "pymvm build-initramfs")
        cmdline = self.string(t, "cmdline", "boot.cmdline", DEFAULT_CMDLINE)
        assert cmdline is not None
        size = len(cmdline.encode())
        if size > CMDLINE_MAX_LEN:
            raise self.error("boot.cmdline", f"{size} bytes long; shorten it to at most "
                             f"{CMDLINE_MAX_LEN}")
        if "\0" in cmdline or "\n" in cmdline:
            raise self.error("boot.cmdline", "contains a NUL or newline; remove it")
        acpi = t.get("acpi", "auto")
        if not isinstance(acpi, bool) and acpi != "auto":
            raise self.error("boot.acpi", f"expected \"auto\", true or false, got {_show(acpi)}")
        return BootConfig(kernel, initrd, cmdline, acpi)

    def boot_file(self, t: Mapping[str, Any], key: str, build_command: str) -> Path | None:
        dotted = f"boot.{key}"
        value = self.string(t, key, dotted, None)
        if value is None:
            return None
        if not value:
            raise self.error(dotted, "is empty; set it to a file path")
        if value.startswith("@"):
            name = value[1:]
            if name not in ARTIFACT_BUILD_COMMANDS:
                known = ", ".join(f"@{n}" for n in ARTIFACT_BUILD_COMMANDS)
                raise self.error(dotted, f"unknown artifact {_show(value)} (known: {known})")
            try:
                path = Path(self.resolve_artifact(name))
            except ConfigError as exc:
                raise self.error(dotted, str(exc)) from None
            if not path.exists():
                raise self.error(dotted, f"{value} has not been built yet (run "
                                 f"'{ARTIFACT_BUILD_COMMANDS[name]}')")
        else:
            path = self.path(value)
            if not path.exists():
                raise self.error(dotted, f"{value} does not exist (build one with "
                                 f"'{build_command}')")
        if path.is_dir():
            raise self.error(dotted, f"{value} is a directory; point it at a file")
        if not os.access(path, os.R_OK):
            raise self.error(dotted, f"{value} is not readable (check its permissions)")
        return path

    def check_kernel_format(self, path: Path, shown: str) -> None:
        try:
            with open(path, "rb") as f:
                head = f.read(0x206)
        except OSError as exc:
            raise self.error("boot.kernel", f"{shown} cannot be read: {exc.strerror} "
                             "(check its permissions)") from None
        if head[:4] == b"\x7fELF" or head[0x202:0x206] == b"HdrS":
            return
        raise self.error(
            "boot.kernel",
            f"{shown} is neither an ELF vmlinux (no \\x7fELF magic) nor a bzImage (no \"HdrS\" "
            "at offset 0x202); point it at vmlinux or arch/x86/boot/bzImage")

    def api(self, t: Mapping[str, Any]) -> ApiConfig:
        self.check_keys(t, ("socket",), "api.")
        raw = self.string(t, "socket", "api.socket", None)
        if raw is None:
            return ApiConfig()
        path = self.path(raw)
        if not raw or path.is_dir():
            raise self.error("api.socket", f"{_show(raw)} is a directory; name the socket file "
                             "to create, e.g. \"/run/pymvm/vm1.sock\"")
        if not path.parent.is_dir():
            raise self.error("api.socket", f"directory {path.parent} does not exist; create it "
                             "or choose another path")
        if len(str(path).encode()) > 107:  # sun_path holds 108 bytes with its NUL
            raise self.error("api.socket", f"{path} is longer than a UNIX socket path may be "
                             "(107 bytes); choose a shorter path")
        return ApiConfig(path)

    def vsock(self, t: Mapping[str, Any], vm_id: str) -> VsockConfig:
        self.check_keys(t, ("cid",), "vsock.")
        cid = self.integer(t, "cid", "vsock.cid", None, VSOCK_CID_MIN, VSOCK_CID_MAX)
        return VsockConfig(cid if cid is not None else default_vsock_cid(vm_id))

    def serial(self, t: Mapping[str, Any]) -> SerialConfig:
        self.check_keys(t, ("output", "path", "input"), "serial.")
        output = self.choice(t, "output", "serial.output", "stdout", ("stdout", "none", "file"))
        raw_path = self.string(t, "path", "serial.path", None)
        path: Path | None = None
        if output == "file":
            if not raw_path:
                raise self.error("serial.path", "required when output = \"file\"; set it to "
                                 "the log file's path")
            path = self.path(raw_path)
            if not path.parent.is_dir():
                raise self.error("serial.path", f"directory {path.parent} does not exist; "
                                 "create it or choose another path")
            if path.is_dir():
                raise self.error("serial.path", f"{raw_path} is a directory; name a file")
        elif raw_path is not None:
            raise self.error("serial.path", f"only used with output = \"file\"; remove it or "
                             f"set output = \"file\" (output is {_show(output)})")
        forward_input = self.boolean(t, "input", "serial.input", True)
        return SerialConfig(output, path, forward_input)  # type: ignore[arg-type]

    def net(self, value: Any, vm_id: str) -> tuple[NetConfig, ...]:
        if isinstance(value, dict):
            raise self.error("net", "expected an array of tables; write [[net]], not [net]")
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error("net", f"expected an array of tables ([[net]]), got {_show(value)}")
        parsed = [self.net_one(t, i) for i, t in enumerate(value)]
        seen: dict[str, dict[str, int]] = {"id": {}, "tap": {}, "mac": {}}
        result = []
        for i, (net, mac) in enumerate(parsed):
            for key, item in (("id", net["id"]), ("tap", net["tap"]), ("mac", mac)):
                if item is None:
                    continue
                if item in seen[key]:
                    raise self.error(f"net[{i}].{key}", f"{_show(item)} is already used by "
                                     f"net[{seen[key][item]}]; choose a unique {key}")
                seen[key][item] = i
        taken = set(seen["mac"])
        for i, (net, mac) in enumerate(parsed):
            if mac is None:
                mac = _generated_mac(vm_id, i, taken)
                taken.add(mac)
            result.append(NetConfig(mac=mac, **net))
        return tuple(result)

    def net_one(self, t: Mapping[str, Any], i: int) -> tuple[dict[str, Any], str | None]:
        pre = f"net[{i}]."
        self.check_keys(t, ("id", "backend", "tap", "bridge", "netns", "mac", "mtu", "socket",
                            "socket_mode", "ip", "host_ip", "swappable"), pre)
        net_id = self.string(t, "id", pre + "id", f"net{i}")
        assert net_id is not None
        if not _ID_RE.fullmatch(net_id):
            raise self.error(pre + "id", f"expected 1-64 characters from A-Z a-z 0-9 _ -, "
                             f"got {_show(net_id)}")
        backend = self.choice(t, "backend", pre + "backend", "vhost-net",
                              ("vhost-net", "vhost-user", "builtin"))
        tap = self.ifname(t, "tap", pre)
        bridge = self.ifname(t, "bridge", pre)
        netns = self.string(t, "netns", pre + "netns", None)
        if netns is not None and (not netns or "/" in netns or netns in (".", "..")
                                  or "\0" in netns):
            raise self.error(pre + "netns", f"{_show(netns)} is not a namespace name; use a "
                             "name as shown by 'ip netns list'")
        mac = self.mac(t, pre)
        mtu = self.integer(t, "mtu", pre + "mtu", None, 68, 65535)
        swappable = self.boolean(t, "swappable", pre + "swappable", False)
        raw_socket = self.string(t, "socket", pre + "socket", None)
        socket_mode = self.choice(t, "socket_mode", pre + "socket_mode", "client",
                                  ("client", "server"))
        socket: Path | None = None
        if backend == "vhost-user":
            if not raw_socket:
                raise self.error(pre + "socket", "required with backend = \"vhost-user\"; set "
                                 "it to the back-end's unix socket path")
            socket = self.path(raw_socket)
            for key in ("tap", "bridge", "netns"):
                if key in t and not swappable:  # swappable: the TAP it may move to
                    raise self.error(pre + key, "not used with backend = \"vhost-user\" (the "
                                     "vhost-user back-end owns the host side); remove it")
        else:
            for key in ("socket", "socket_mode"):
                if key in t:
                    raise self.error(pre + key, f"only used with backend = \"vhost-user\"; "
                                     f"remove it (backend is {_show(backend)})")
        interface = self.interface(t, "ip", pre, "10.0.0.2/24")
        host_interface = self.interface(t, "host_ip", pre, "10.0.0.1/24")
        if host_interface is not None and backend == "vhost-user" and not swappable:
            raise self.error(pre + "host_ip", "not used with backend = \"vhost-user\" (the "
                             "vhost-user back-end owns the host side); remove it")
        net = dict(id=net_id, backend=backend, tap=tap, bridge=bridge, netns=netns, mtu=mtu,
                   socket=socket, socket_mode=socket_mode, ip=interface, host_ip=host_interface,
                   swappable=swappable)
        return net, mac

    def block(self, value: Any) -> tuple[BlockConfig, ...]:
        if isinstance(value, dict):
            raise self.error("block", "expected an array of tables; write [[block]], not [block]")
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error("block", f"expected an array of tables ([[block]]), got {_show(value)}")
        disks = [self.block_one(t, i) for i, t in enumerate(value)]
        seen: dict[str, int] = {}
        images: dict[Path, int] = {}
        root = None
        for i, disk in enumerate(disks):
            if disk.id in seen:
                raise self.error(f"block[{i}].id", f"{_show(disk.id)} is already used by "
                                 f"block[{seen[disk.id]}]; choose a unique id")
            seen[disk.id] = i
            if disk.path is not None:
                key = disk.path.resolve()
                if key in images and not (disk.read_only and disks[images[key]].read_only):
                    raise self.error(f"block[{i}].path", f"{disk.path} is already block"
                                     f"[{images[key]}]'s image; one image serves one writable disk")
                images[key] = i
            if disk.root:
                if root is not None:
                    raise self.error(f"block[{i}].root", f"block[{root}] is already the root "
                                     "disk; set root = true on one disk only")
                root = i
        return tuple(disks)

    def block_one(self, t: Mapping[str, Any], i: int) -> BlockConfig:
        from .images.disk import DiskImageError, check_image, open_image

        pre = f"block[{i}]."
        self.check_keys(t, ("id", "backend", "path", "socket", "socket_mode", "read_only",
                            "root", "serial"), pre)
        disk_id = self.string(t, "id", pre + "id", f"disk{i}")
        assert disk_id is not None
        if not _ID_RE.fullmatch(disk_id):
            raise self.error(pre + "id", f"expected 1-64 characters from A-Z a-z 0-9 _ -, "
                             f"got {_show(disk_id)}")
        backend = self.choice(t, "backend", pre + "backend", "builtin", ("builtin", "vhost-user"))
        read_only = self.boolean(t, "read_only", pre + "read_only", False)
        root = self.boolean(t, "root", pre + "root", False)
        serial = self.string(t, "serial", pre + "serial", "")
        assert serial is not None
        if len(serial.encode()) > 20 or not serial.isprintable():
            raise self.error(pre + "serial", f"{_show(serial)} is not up to 20 printable bytes; "
                             "shorten it")
        path = socket = None
        socket_mode = "client"
        if backend == "builtin":
            raw = self.string(t, "path", pre + "path", None)
            if not raw:
                raise self.error(pre + "path", "required with backend = \"builtin\"; set it to a "
                                 "raw disk image (e.g. one made by 'pymvm build-rootfs')")
            path = self.path(raw)
            try:
                check_image(path, read_only)
                open_image(path, read_only=read_only).close()  # free now, not locked by a VM
            except DiskImageError as e:
                raise self.error(pre + "path", str(e)) from None
            for key in ("socket", "socket_mode"):
                if key in t:
                    raise self.error(pre + key, "only used with backend = \"vhost-user\"; "
                                     "remove it (backend is \"builtin\")")
        else:
            raw = self.string(t, "socket", pre + "socket", None)
            if not raw:
                raise self.error(pre + "socket", "required with backend = \"vhost-user\"; set "
                                 "it to the vhost-user-blk back-end's unix socket path")
            socket = self.path(raw)
            socket_mode = self.choice(t, "socket_mode", pre + "socket_mode", "client",
                                      ("client", "server"))
            if "path" in t:
                raise self.error(pre + "path", "not used with backend = \"vhost-user\" (the "
                                 "back-end owns the image); remove it")
            if serial:
                raise self.error(pre + "serial", "only used with backend = \"builtin\" (the "
                                 "vhost-user back-end answers GET_ID); remove it")
        return BlockConfig(disk_id, backend, path, socket, socket_mode,  # type: ignore[arg-type]
                           read_only, root, serial)

    def interface(self, t: Mapping[str, Any], key: str, pre: str, example: str):
        raw = self.string(t, key, pre + key, None)
        if raw is None:
            return None
        try:
            return ipaddress.ip_interface(raw)
        except ValueError:
            raise self.error(pre + key, f"{_show(raw)} is not an address with prefix "
                             f"length; write it like \"{example}\"") from None

    def ifname(self, t: Mapping[str, Any], key: str, pre: str) -> str | None:
        name = self.string(t, key, pre + key, None)
        if name is None:
            return None
        if not 0 < len(name.encode()) < IFNAMSIZ or name in (".", "..") or any(
            c in name for c in "/: \t\n\0"
        ):
            raise self.error(pre + key, f"{_show(name)} is not a valid interface name; use 1-15 "
                             "characters without '/', ':' or spaces")
        return name

    def mac(self, t: Mapping[str, Any], pre: str) -> str | None:
        value = self.string(t, "mac", pre + "mac", None)
        if value is None:
            return None
        if not _MAC_RE.fullmatch(value):
            raise self.error(pre + "mac", f"expected six hex bytes like \"52:54:00:12:34:56\", "
                             f"got {_show(value)}")
        first = int(value[:2], 16)
        if first & 0x01:
            raise self.error(pre + "mac", f"{value} is a multicast address; clear the lowest "
                             "bit of the first byte (e.g. 52:...)")
        if value.replace(":", "") == "000000000000":
            raise self.error(pre + "mac", "00:00:00:00:00:00 is not usable; choose another")
        return value.lower()


def default_vsock_cid(vm_id: str) -> int:
    """The guest CID of a VM whose [vsock] sets none: a hash of its id, never 0-2 (reserved)."""
    import hashlib  # maps libcrypto: only for a VM that needs it (issue 15)

    digest = hashlib.sha256(b"pymvm-vsock-cid\0" + vm_id.encode()).digest()
    return VSOCK_CID_MIN + int.from_bytes(digest[:4], "little") % (VSOCK_CID_MAX - VSOCK_CID_MIN + 1)


def _generated_mac(vm_id: str, index: int, taken: set[str]) -> str:
    """Stable per (vm id, index), locally administered unicast (first byte x2/x6/xA/xE)."""
    import hashlib  # maps libcrypto: only for a VM that needs it (issue 15)

    for attempt in range(1000):
        digest = hashlib.sha256(f"{vm_id}/{index}/{attempt}".encode()).digest()
        octets = bytearray(digest[:6])
        octets[0] = (octets[0] & 0xFC) | 0x02
        mac = ":".join(f"{b:02x}" for b in octets)
        if mac not in taken:
            return mac
    raise ConfigError(f"cannot generate a unique MAC for net[{index}]; set mac explicitly")
