"""pymvm.nested without booting anything: decisions, command lines, script, status files.

run_nested is driven through a fake `vng` that runs the generated script on this host.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pymvm import nested
from pymvm.nested import (
    EXIT_NESTED_HOST_DIED,
    EXIT_TIMEOUT,
    HostFacts,
    NestedHostError,
    assess,
)

TCG_WARNING = (
    b"qemu-system-x86_64: warning: TCG doesn't support requested feature: "
    b"CPUID.07H:EBX.rdseed [bit 18]\n"
)


def facts(
    flags: str = "fpu svm lm",
    modules: str = "kvm kvm_amd",
    dev_kvm: bool = True,
    vhost_net: bool = True,
) -> HostFacts:
    return HostFacts(
        cpu_flags=frozenset(flags.split()),
        modules=frozenset(modules.split()),
        has_dev_kvm=dev_kvm,
        has_vhost_net=vhost_net,
    )


# ----------------------------------------------------------------------------- decision


def test_hardware_kvm_with_vhost_net_can_boot_linux() -> None:
    ok, why = assess(facts())
    assert ok
    assert "kvm_amd" in why


def test_intel_vmx_with_kvm_intel_can_boot_linux() -> None:
    assert assess(facts(flags="vmx lm", modules="kvm kvm_intel"))[0]


def test_paravirtual_kvm_pvm_cannot_boot_linux_even_with_everything_else() -> None:
    ok, why = assess(facts(modules="kvm kvm_amd kvm_pvm"))
    assert not ok
    assert why == "/dev/kvm is the paravirtual kvm_pvm: Linux guests cannot boot on it"


def test_cpu_without_vmx_or_svm_cannot_boot_linux() -> None:
    ok, why = assess(facts(flags="fpu lm hypervisor"))
    assert not ok
    assert "neither vmx nor svm" in why


def test_no_kvm_intel_or_amd_module_cannot_boot_linux() -> None:
    ok, why = assess(facts(modules="kvm"))
    assert not ok
    assert "kvm_intel" in why


def test_missing_vhost_net_cannot_boot_linux() -> None:
    ok, why = assess(facts(vhost_net=False))
    assert not ok
    assert "/dev/vhost-net" in why


def test_missing_dev_kvm_cannot_boot_linux() -> None:
    ok, why = assess(facts(dev_kvm=False))
    assert not ok
    assert "/dev/kvm does not exist" in why


def test_override_never_runs_directly_whatever_the_host() -> None:
    assert assess(facts(modules="kvm kvm_pvm"), "never")[0]


def test_override_always_uses_nested_host_on_a_capable_host() -> None:
    ok, why = assess(facts(), "always")
    assert not ok
    assert "PYMVM_NESTED=always" in why


def test_override_always_inside_nested_host_detects_instead_of_nesting_again() -> None:
    assert assess(facts(), "always", nested=True)[0]


def test_invalid_override_is_an_error_naming_the_valid_values() -> None:
    with pytest.raises(NestedHostError, match="always, never or auto"):
        assess(facts(), "sometimes")


def test_can_boot_linux_here_reads_the_override_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PYMVM_IN_NESTED", raising=False)
    monkeypatch.setattr(nested, "in_nested_host", lambda: False)
    monkeypatch.setenv("PYMVM_NESTED", "always")
    assert not nested.can_boot_linux_here(facts())[0]
    monkeypatch.setenv("PYMVM_NESTED", "auto")
    assert nested.can_boot_linux_here(facts())[0]


def test_cpu_flags_come_from_the_flags_line_of_cpuinfo() -> None:
    text = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\n"
        "flags\t\t: fpu svm lm\nbugs\t\t: sysret_ss_attrs\n"
    )
    assert nested.cpu_flags_from_cpuinfo(text) == {"fpu", "svm", "lm"}


def test_host_facts_are_gathered_from_cpuinfo_sys_module_and_dev(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text("flags\t: fpu svm\n")
    for module in ("kvm", "kvm_amd", "unrelated"):
        (tmp_path / "module" / module).mkdir(parents=True)
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "kvm").touch()
    got = HostFacts.gather(
        cpuinfo=tmp_path / "cpuinfo",
        sys_module=tmp_path / "module",
        dev=tmp_path / "dev",
        try_modprobe=False,
    )
    assert got == facts(flags="fpu svm", modules="kvm kvm_amd", vhost_net=False)


def test_in_nested_host_is_detected_from_env_or_kernel_cmdline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyS0 quiet\n")
    monkeypatch.delenv("PYMVM_IN_NESTED", raising=False)
    assert not nested.in_nested_host(cmdline=cmdline)
    cmdline.write_text("console=ttyS0 pymvm_nested=1 quiet\n")
    assert nested.in_nested_host(cmdline=cmdline)
    cmdline.write_text("quiet\n")
    monkeypatch.setenv("PYMVM_IN_NESTED", "1")
    assert nested.in_nested_host(cmdline=cmdline)


# ----------------------------------------------------------------------------- kernel


def test_newest_kernel_is_chosen_comparing_versions_numerically(tmp_path: Path) -> None:
    for name in ("vmlinuz-6.1.0-56-amd64", "vmlinuz-6.12.9-amd64", "vmlinuz-6.9.1-amd64",
                 "vmlinuz-6.99.0-arm64"):
        (tmp_path / name).touch()
    assert nested.find_kernel(tmp_path).name == "vmlinuz-6.12.9-amd64"


def test_missing_kernel_error_names_the_packages_to_install(tmp_path: Path) -> None:
    with pytest.raises(NestedHostError, match="apt-get install linux-image-amd64 qemu-system-x86"):
        nested.find_kernel(tmp_path)


def test_missing_qemu_error_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nested.shutil, "which", lambda name: None)
    with pytest.raises(NestedHostError, match="apt-get install qemu-system-x86"):
        nested.check_tools()


def test_missing_busybox_error_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nested.shutil, "which", lambda name: name if "qemu" in name else None)
    with pytest.raises(NestedHostError, match="apt-get install busybox-static"):
        nested.check_tools()


def test_missing_vng_error_names_the_pip_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nested.sys, "executable", "/nonexistent/bin/python3")
    monkeypatch.setattr(nested.shutil, "which", lambda name: None)
    with pytest.raises(NestedHostError, match="pip install virtme-ng"):
        nested.find_vng()


# ----------------------------------------------------------------------------- vng command


def test_vng_command_boots_tcg_with_svm_and_shares_rwdirs(tmp_path: Path) -> None:
    cmd = nested.vng_command(
        vng="vng",
        kernel=Path("/boot/vmlinuz-6.1.0-56-amd64"),
        script=Path("/tmp/pymvm-nested-x/run.sh"),
        rwdirs=[Path("/tmp/pymvm-nested-x"), Path("/src/repo")],
        cwd=Path("/src/repo"),
        cpus=3,
        memory="4G",
    )
    assert cmd[:3] == ["vng", "--run", "/boot/vmlinuz-6.1.0-56-amd64"]
    assert "--disable-kvm" in cmd
    assert "--qemu-opts=-cpu EPYC,+svm" in cmd
    assert cmd[cmd.index("--cpus") + 1] == "3"
    assert cmd[cmd.index("--memory") + 1] == "4G"
    assert "--rwdir=/src/repo=/src/repo" in cmd
    assert "--rwdir=/tmp/pymvm-nested-x=/tmp/pymvm-nested-x" in cmd
    assert "--append=pymvm_nested=1 nohz=off highres=off" in cmd  # a periodic timer
    assert cmd[-2:] == ["--exec", "/bin/sh /tmp/pymvm-nested-x/run.sh"]


def test_vng_command_logs_the_kernel_console_to_a_second_serial_port() -> None:
    cmd = nested.vng_command(
        vng="vng", kernel=Path("/k"), script=Path("/t/run.sh"), rwdirs=[], cwd=Path("/"),
        cpus=2, memory="3G", console_log=Path("/t/console.log"),
    )
    assert "--qemu-opts=-cpu EPYC,+svm -serial file:/t/console.log" in cmd
    # ttyS0 last: it stays /dev/console, as vng expects.
    assert ("--append=pymvm_nested=1 nohz=off highres=off console=ttyS1 console=ttyS0 "
            "loglevel=4") in cmd


def test_vng_command_can_pick_single_threaded_tcg() -> None:
    cmd = nested.vng_command(
        vng="vng", kernel=Path("/k"), script=Path("/t/run.sh"), rwdirs=[], cwd=Path("/"),
        cpus=2, memory="3G", tcg_thread="single",
    )
    assert "--qemu-opts=-cpu EPYC,+svm -accel tcg,thread=single" in cmd


def test_vng_command_refuses_a_path_vng_cannot_share() -> None:
    with pytest.raises(NestedHostError, match="has a space"):
        nested.vng_command(
            vng="vng", kernel=Path("/k"), script=Path("/t/run.sh"), rwdirs=[Path("/my repo")],
            cwd=Path("/"), cpus=2, memory="3G",
        )


def test_rwdirs_inside_another_rwdir_are_dropped(tmp_path: Path) -> None:
    (tmp_path / "repo" / "results").mkdir(parents=True)
    got = nested._dedupe_rwdirs(
        [tmp_path / "repo" / "results", tmp_path / "repo", tmp_path / "other", tmp_path / "repo"]
    )
    assert got == [tmp_path / "repo", tmp_path / "other"]


def test_nested_env_passes_path_pythonpath_and_pymvm_vars_only() -> None:
    env = nested.nested_env(
        {"EXTRA": "x y"},
        environ={
            "PATH": "/opt/example/shims:/usr/bin",
            "PYTHONPATH": "/src",
            "PYMVM_CACHE_DIR": "/var/cache/pymvm",
            "PYMVM_NESTED": "always",
            "SECRET_TOKEN": "no",
        },
    )
    assert env["PATH"].split(os.pathsep) == [
        str(Path(sys.executable).parent), "/opt/example/shims", "/usr/bin"
    ]
    assert env["PYTHONPATH"] == "/src"
    assert env["PYMVM_CACHE_DIR"] == "/var/cache/pymvm"
    assert env["PYMVM_IN_NESTED"] == "1"
    assert env["EXTRA"] == "x y"
    assert "PYMVM_NESTED" not in env
    assert "SECRET_TOKEN" not in env


def test_nested_env_refuses_a_name_the_shell_cannot_export() -> None:
    with pytest.raises(NestedHostError, match="cannot be passed"):
        nested.nested_env({"A-B": "1"}, environ={})


# ----------------------------------------------------------------------------- script


def test_script_runs_argv_verbatim_in_cwd_with_env_and_records_status(tmp_path: Path) -> None:
    work = tmp_path / "a dir"
    work.mkdir()
    status = tmp_path / "exit-status"
    argv = [
        sys.executable, "-c",
        "import json, os, sys; json.dump([os.getcwd(), sys.argv[1:], os.environ['V']],"
        " open('out.json', 'w')); sys.exit(7)",
        "it's", "$HOME", "a;b", "",
    ]
    script = nested.render_script(
        argv, cwd=work, env={"V": "$(x) 'q'"}, status_path=status, modules=()
    )
    done = subprocess.run(["/bin/sh", "-c", script], check=False)
    assert done.returncode == 7
    assert nested.read_exit_status(status) == 7
    assert json.loads((work / "out.json").read_text()) == [
        str(work), ["it's", "$HOME", "a;b", ""], "$(x) 'q'"
    ]


def test_script_loads_the_kvm_vhost_and_tun_modules_first() -> None:
    script = nested.render_script(["true"], cwd=Path("/"), env={}, status_path=Path("/s"))
    lines = script.splitlines()
    loaded = [line.split()[1] for line in lines if line.startswith("modprobe")]
    assert loaded == ["kvm_amd", "vhost_net", "vhost_vsock", "tun"]


def test_script_refuses_an_empty_command() -> None:
    with pytest.raises(NestedHostError, match="no command"):
        nested.render_script([], cwd=Path("/"), env={}, status_path=Path("/s"))


@pytest.mark.parametrize(("text", "want"), [("3\n", 3), ("0", 0), ("", None), ("x\n", None)])
def test_exit_status_file_is_read_or_rejected(tmp_path: Path, text: str, want: int | None) -> None:
    (tmp_path / "s").write_text(text)
    assert nested.read_exit_status(tmp_path / "s") == want


def test_missing_exit_status_file_reads_as_none(tmp_path: Path) -> None:
    assert nested.read_exit_status(tmp_path / "absent") is None


# ----------------------------------------------------------------------------- output


def test_output_filter_drops_qemu_tcg_warnings_and_keeps_the_rest() -> None:
    sink = io.BytesIO()
    out = nested._OutputFilter(sink)
    out.feed(b"booting\n" + TCG_WARNING[:20])
    out.feed(TCG_WARNING[20:] + b"tests ")
    out.feed(b"..")
    assert sink.getvalue() == b"booting\ntests .."  # partial lines come out at once
    out.feed(b"qemu-system-x86_64: warning: other\n")
    out.close()
    assert sink.getvalue() == b"booting\ntests ..qemu-system-x86_64: warning: other\n"


def test_output_filter_writes_a_held_prefix_at_close() -> None:
    sink = io.BytesIO()
    out = nested._OutputFilter(sink)
    out.feed(b"qemu")
    assert sink.getvalue() == b""
    out.close()
    assert sink.getvalue() == b"qemu"


# ----------------------------------------------------------------------------- fast Python


def _write(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _dist(
    site: Path, name: str, files: list[str], requires: list[str] = [], extras: list[str] = []
) -> None:
    info = site / f"{name}-1.0.dist-info"
    meta = ["Metadata-Version: 2.1", f"Name: {name}", "Version: 1.0"]
    meta += [f"Provides-Extra: {e}" for e in extras] + [f"Requires-Dist: {r}" for r in requires]
    _write(info / "METADATA", "\n".join(meta) + "\n")
    _write(info / "RECORD", "".join(f"{f},,\n" for f in [*files, f"{info.name}/METADATA"]))
    for f in files:
        _write(site / f, "x = 1\n")


@pytest.fixture
def fake_python(tmp_path: Path) -> tuple[Path, dict[str, str], Path]:
    """A Python prefix: stdlib with a test suite, site-packages with pymvm, a requirement
    (via an extra), a pytest plugin and an unrelated distribution; plus pymvm's package."""
    prefix = tmp_path / "py"
    stdlib = prefix / "lib/python3.11"
    site = stdlib / "site-packages"
    _write(stdlib / "os.py")
    _write(stdlib / "__pycache__/os.cpython-311.pyc")
    _write(stdlib / "__pycache__/os.cpython-311.opt-1.pyc")
    _write(stdlib / "test/test_os.py")
    _write(stdlib / "lib-dynload/_ssl.so")
    _write(prefix / "bin/python3.11")
    _write(prefix / "lib/libpython3.11.so.1.0")
    _write(site / "distutils-precedence.pth", "import os\n")
    _dist(site, "pymvm", ["__editable__.pymvm.pth"], ["needed; extra == 'test'"], ["test"])
    _dist(site, "needed", ["needed/__init__.py"], ["deep>=1", "optional; extra == 'all'"], ["all"])
    _dist(site, "deep", ["deep.py"])
    _dist(site, "optional", ["optional/__init__.py"])
    _dist(site, "unrelated", ["unrelated/big.py"])
    _dist(site, "plugin", ["plugin.py"])
    _write(site / "plugin-1.0.dist-info/entry_points.txt", "[pytest11]\nplugin = plugin\n")
    package = tmp_path / "repo/pymvm"
    _write(package / "__init__.py", "A = 1\n")
    _write(package / "_kvm.abi3.so")
    paths = {k: str(stdlib) for k in ("stdlib", "platstdlib")}
    paths |= {k: str(site) for k in ("purelib", "platlib")}
    return prefix, paths, package


def test_needed_distributions_follow_requirements_extras_and_pytest_plugins(
    fake_python: tuple[Path, dict[str, str], Path],
) -> None:
    _, paths, _ = fake_python
    dists = nested.needed_distributions([Path(paths["purelib"])])
    # pymvm's own extras count; a requirement's extras do not.
    assert sorted(d.metadata["Name"] for d in dists) == ["deep", "needed", "plugin", "pymvm"]


def test_python_trees_copy_stdlib_needed_packages_and_pymvm_but_not_tests(
    fake_python: tuple[Path, dict[str, str], Path],
) -> None:
    prefix, paths, package = fake_python
    trees = nested.python_trees(package_dir=package, prefix=prefix, paths=paths)
    assert [t.root for t in trees] == [prefix.resolve(), package.resolve()]
    files = {str(f) for f in trees[0].files}
    site = "lib/python3.11/site-packages"
    for want in (
        "bin/python3.11", "lib/libpython3.11.so.1.0", "lib/python3.11/os.py",
        "lib/python3.11/__pycache__/os.cpython-311.pyc", "lib/python3.11/lib-dynload/_ssl.so",
        f"{site}/distutils-precedence.pth", f"{site}/deep.py", f"{site}/needed/__init__.py",
        f"{site}/plugin.py", f"{site}/unrelated-1.0.dist-info/METADATA",
    ):
        assert want in files
    for unwanted in (
        "lib/python3.11/test/test_os.py", "lib/python3.11/__pycache__/os.cpython-311.opt-1.pyc",
        f"{site}/unrelated/big.py", f"{site}/optional/__init__.py",
    ):
        assert unwanted not in files
    assert {str(f) for f in trees[1].files} == {"__init__.py", "_kvm.abi3.so"}


def test_python_trees_of_a_system_python_overlay_only_its_library_folders(
    fake_python: tuple[Path, dict[str, str], Path],
) -> None:
    _, paths, package = fake_python
    trees = nested.python_trees(package_dir=package, prefix=Path("/usr"), paths=paths)
    assert [t.root for t in trees] == [Path(paths["stdlib"]).resolve(), package.resolve()]


def test_staged_copy_gets_bytecode_valid_for_the_original_source(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    source = _write(root / "mod.py", "VALUE = 42\n")
    stage = tmp_path / "stage"
    nested._stage([nested.FastTree(root, (Path("mod.py"),))], stage)
    cached = stage / f"t0/__pycache__/mod.{sys.implementation.cache_tag}.pyc"
    assert (stage / "t0/mod.py").read_text() == "VALUE = 42\n"
    # Timestamp bytecode records the source's mtime and size: the copy must keep both.
    header = cached.read_bytes()[8:16]
    assert int.from_bytes(header[:4], "little") == int(source.stat().st_mtime)
    assert int.from_bytes(header[4:], "little") == source.stat().st_size
    assert not (root / "__pycache__").exists()  # the original is left alone


@pytest.mark.skipif(
    not (Path("/sbin/mke2fs").exists() or Path("/usr/sbin/mke2fs").exists()),
    reason="needs mke2fs (e2fsprogs)",
)
def test_fast_image_is_an_ext2_file_system(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    _write(root / "a/b.py", "B = 2\n")
    image = tmp_path / "fast.img"
    assert nested.build_fast_image([nested.FastTree(root, (Path("a/b.py"),))], image)
    superblock = image.read_bytes()[1024:1024 + 64]
    assert superblock[56:58] == b"\x53\xef"  # the ext2 magic


def test_fast_image_is_skipped_with_a_warning_without_mke2fs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nested.shutil, "which", lambda *a, **k: None)
    tree = nested.FastTree(tmp_path, (Path("x"),))
    assert not nested.build_fast_image([tree], tmp_path / "fast.img")


def test_fast_mounts_overlay_each_root_from_the_image_only_inside_the_nested_host() -> None:
    roots = [Path("/opt/py"), Path("/src/pymvm")]
    lines = nested.render_fast_mounts(Path("/w/fast.img"), roots)
    assert lines[0] == f"if grep -qw {nested.KERNEL_CMDLINE_MARK} /proc/cmdline; then"
    text = "\n".join(lines)
    assert "mount -t ext2 -o loop,ro,noatime /w/fast.img /run/pymvm-fast" in text
    # The folder stays the lowest layer: files the image lacks are still found.
    assert "-o ro,lowerdir=/run/pymvm-fast/t0:/opt/py /opt/py ||" in text
    assert "-o ro,lowerdir=/run/pymvm-fast/t1:/src/pymvm /src/pymvm ||" in text
    assert text.count("warning:") == 3  # each failure only warns


def test_fast_mounts_are_skipped_outside_the_nested_host(tmp_path: Path) -> None:
    lines = nested.render_fast_mounts(tmp_path / "img", [tmp_path])
    script = "\n".join(["modprobe() { echo modprobe-ran; }", *lines]) + "\n"
    if nested.KERNEL_CMDLINE_MARK in Path("/proc/cmdline").read_text().split():
        pytest.skip("running inside the nested host")
    done = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == ""


def test_script_runs_the_prelude_before_the_command() -> None:
    script = nested.render_script(
        ["true"], cwd=Path("/"), env={"A": "1"}, status_path=Path("/s"), prelude=["echo pre"]
    )
    lines = script.splitlines()
    assert lines.index("echo pre") < lines.index("export A=1") < lines.index("true")


def test_run_nested_mounts_the_fast_image_when_it_builds(
    fake_vng: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = nested.FastTree(fake_vng, (Path("args"),))
    monkeypatch.setattr(nested, "python_trees", lambda: [tree])
    built: list[Path] = []

    def fake_build(trees: list[nested.FastTree], image: Path) -> bool:
        image.write_bytes(b"img")
        built.append(image)
        return True

    monkeypatch.setattr(nested, "build_fast_image", fake_build)
    monkeypatch.setattr(
        nested,
        "render_fast_mounts",
        lambda image, roots: [f"echo mounts {image.name} {len(roots)}"],
    )
    sink = io.BytesIO()
    assert nested.run_nested(["true"], cwd=fake_vng, output=sink) == 0
    assert sink.getvalue() == f"mounts {nested.FAST_IMAGE_FILE} 1\n".encode()
    assert built[0].name == nested.FAST_IMAGE_FILE


# ----------------------------------------------------------------------------- run_nested


FAKE_VNG = textwrap.dedent(
    """\
    #!/bin/sh
    # Plays vng: prints QEMU noise, then runs --exec on this host (or not, per FAKE_MODE).
    printf '%s\\n' "$*" > "$FAKE_ARGS"
    # QEMU would create its monitor socket; a plain file stands for it.
    mon=$(printf '%s\\n' "$*" | sed -n 's/.*-monitor unix:\\([^,]*\\),.*/\\1/p')
    [ -n "$mon" ] && touch "$mon"
    echo "qemu-system-x86_64: warning: TCG doesn't support requested feature: x" >&2
    while [ $# -gt 0 ]; do [ "$1" = --exec ] && exec_cmd=$2; shift; done
    case "$FAKE_MODE" in
      die) echo "Kernel panic"; exit 0 ;;
      hang) exec sleep 600 ;;
    esac
    PATH="$FAKE_BIN:$PATH" sh -c "$exec_cmd"
    exit 0
    """
)


@pytest.fixture
def fake_vng(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    vng = bin_dir / "vng"
    vng.write_text(FAKE_VNG)
    vng.chmod(0o755)
    # The script's modprobe lines must not touch this host's kernel.
    (bin_dir / "modprobe").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "modprobe").chmod(0o755)
    monkeypatch.setattr(nested, "find_vng", lambda: str(vng))
    monkeypatch.setattr(nested, "find_kernel", lambda: Path("/boot/vmlinuz-test-amd64"))
    monkeypatch.setattr(nested, "check_tools", lambda: None)
    monkeypatch.setattr(nested, "python_trees", lambda: [])  # no image: tests stay fast
    monkeypatch.setenv("FAKE_BIN", str(bin_dir))
    monkeypatch.setenv("FAKE_ARGS", str(tmp_path / "args"))
    monkeypatch.setenv("PYMVM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def test_run_nested_returns_the_inner_status_not_vngs(fake_vng: Path) -> None:
    sink = io.BytesIO()
    rc = nested.run_nested(["sh", "-c", "echo inner; exit 3"], cwd=fake_vng, output=sink)
    assert rc == 3
    assert sink.getvalue() == b"inner\n"  # streamed, with QEMU's TCG warning dropped


def test_run_nested_shares_cwd_and_rwdirs_and_removes_its_temp_dir(fake_vng: Path) -> None:
    extra = fake_vng / "extra"
    extra.mkdir()
    rc = nested.run_nested(["true"], cwd=fake_vng, rwdirs=[extra], output=io.BytesIO())
    assert rc == 0
    args = (fake_vng / "args").read_text()
    assert f"--rwdir={fake_vng}={fake_vng}" in args
    assert f"--rwdir={extra}=" not in args  # inside cwd: already shared
    assert f"--rwdir={fake_vng / 'cache'}={fake_vng / 'cache'}" not in args  # inside cwd
    script = shlex.split(args.split("--exec ")[1])[1]
    assert not Path(script).parent.exists()


def test_run_nested_reports_a_dead_nested_host_with_a_distinct_code(
    fake_vng: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FAKE_MODE", "die")
    rc = nested.run_nested(["true"], cwd=fake_vng, output=io.BytesIO())
    assert rc == EXIT_NESTED_HOST_DIED
    assert "without recording the command's exit status" in capsys.readouterr().err


def test_run_nested_timeout_kills_the_nested_host(
    fake_vng: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FAKE_MODE", "hang")
    started = time.monotonic()
    rc = nested.run_nested(["true"], cwd=fake_vng, output=io.BytesIO(), timeout=0.5)
    assert rc == EXIT_TIMEOUT
    assert time.monotonic() - started < 60  # "hang" never ends by itself
    assert "timed out" in capsys.readouterr().err


def test_run_nested_stall_timeout_stops_a_silent_host_but_not_a_chatty_one(
    fake_vng: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prints a line every 0.1 s for 1.5 s: longer than the stall limit, never silent that long.
    chatty = ["sh", "-c", "i=0; while [ $i -lt 15 ]; do echo $i; sleep 0.1; i=$((i+1)); done"]
    sink = io.BytesIO()
    assert nested.run_nested(chatty, cwd=fake_vng, output=sink, stall_timeout=1.0) == 0
    assert sink.getvalue().split() == [str(i).encode() for i in range(15)]

    started = time.monotonic()
    silent = ["sh", "-c", "echo started; exec sleep 600"]
    sink = io.BytesIO()
    rc = nested.run_nested(silent, cwd=fake_vng, output=sink, stall_timeout=1.0)
    assert rc == EXIT_TIMEOUT
    assert time.monotonic() - started < 60
    assert sink.getvalue() == b"started\n"
    err = capsys.readouterr().err
    assert "printed nothing for 1 s" in err
    # What the host was doing: its heartbeat, with the process table.
    assert "last heartbeat" in err and "PID  PPID STAT" in err


def test_run_nested_stops_a_host_whose_heartbeat_stopped(
    fake_vng: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # One heartbeat, then none (as when the nested kernel stops scheduling): a frozen host
    # is stopped after FROZEN_AFTER_S, though no stall or overall timeout is set.
    monkeypatch.setattr(nested, "HEARTBEAT_INTERVAL_S", 600)
    monkeypatch.setattr(nested, "FROZEN_AFTER_S", 1.0)
    started = time.monotonic()
    rc = nested.run_nested(["sh", "-c", "echo started; exec sleep 600"], cwd=fake_vng,
                           output=io.BytesIO())
    assert rc == EXIT_TIMEOUT
    assert time.monotonic() - started < 60
    err = capsys.readouterr().err
    assert "froze: its heartbeat stopped" in err and "last heartbeat" in err


def test_run_nested_shares_the_image_cache_and_names_it_inside(
    fake_vng: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cache = tmp_path_factory.mktemp("elsewhere") / "pymvm-cache"
    monkeypatch.delenv("PYMVM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache.parent))
    sink = io.BytesIO()
    assert nested.run_nested(
        ["sh", "-c", 'echo "$PYMVM_CACHE_DIR"'], cwd=fake_vng, output=sink
    ) == 0
    assert sink.getvalue().decode().strip() == str(cache.parent / "pymvm")
    assert f"--rwdir={cache.parent / 'pymvm'}=" in (fake_vng / "args").read_text()


# ----------------------------------------------------------------------------- main


def test_main_runs_directly_when_linux_can_boot_here(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PYMVM_IN_NESTED", raising=False)
    monkeypatch.setattr(nested, "in_nested_host", lambda: False)
    monkeypatch.setenv("PYMVM_NESTED", "never")
    assert nested.main(["--", "sh", "-c", "exit 4"]) == 4
    assert "running directly (PYMVM_NESTED=never" in capsys.readouterr().err


def test_main_uses_the_nested_host_when_linux_cannot_boot_here(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[list[str], dict[str, object]]] = []
    monkeypatch.setattr(nested, "in_nested_host", lambda: False)
    monkeypatch.setattr(nested, "can_boot_linux_here", lambda: (False, "because"))
    monkeypatch.setattr(nested, "run_nested", lambda argv, **kw: calls.append((argv, kw)) or 5)
    assert nested.main(["--cpus", "3", "--", "pytest", "-x"]) == 5
    assert calls[0][0] == ["pytest", "-x"]
    assert calls[0][1]["cpus"] == 3
    assert "inside the nested KVM host (because)" in capsys.readouterr().err


def test_main_inside_the_nested_host_never_nests_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(nested, "in_nested_host", lambda: True)
    monkeypatch.setattr(nested, "run_nested", lambda *a, **kw: pytest.fail("nested again"))
    assert nested.main(["--", "true"]) == 0


# ------------------------------------------------------------------- benchmark attempts


def test_attempts_rerun_the_whole_command_only_after_a_frozen_or_dead_host(
    capsys: pytest.CaptureFixture[str],
) -> None:
    statuses = iter([EXIT_TIMEOUT, EXIT_NESTED_HOST_DIED, 3])
    calls = []

    def run_once() -> int:
        calls.append(1)
        return next(statuses)

    assert nested.run_with_attempts(run_once, 3) == 3  # the command's own status, third host
    assert len(calls) == 3
    err = capsys.readouterr().err
    assert "attempt 2 of 3" in err and "attempt 3 of 3" in err
    assert "not a result of the command" in err


def test_attempts_never_rerun_a_command_that_failed_by_itself() -> None:
    calls = []

    def run_once() -> int:
        calls.append(1)
        return 1  # the benchmark itself failed: a real result, never retried

    assert nested.run_with_attempts(run_once, 3) == 1
    assert len(calls) == 1


def test_attempts_give_up_with_the_hosts_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert nested.run_with_attempts(lambda: EXIT_TIMEOUT, 2) == EXIT_TIMEOUT
    assert "giving up after 2 attempt(s)" in capsys.readouterr().err


def test_main_reruns_in_a_fresh_nested_host_when_the_first_one_died(
    fake_vng: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The first fake host dies without recording a status; the second runs the command.
    monkeypatch.setattr(nested, "can_boot_linux_here", lambda: (False, "test"))
    monkeypatch.setattr(nested, "in_nested_host", lambda: False)
    monkeypatch.chdir(fake_vng)
    marker = fake_vng / "died-once"
    # FAKE_MODE is read by the fake vng; switch it after the first host via a wrapper.
    real_run_nested = nested.run_nested
    hosts = []

    def run_nested(*args, **kwargs):
        hosts.append(1)
        monkeypatch.setenv("FAKE_MODE", "die" if len(hosts) == 1 else "run")
        return real_run_nested(*args, **kwargs)

    monkeypatch.setattr(nested, "run_nested", run_nested)
    rc = nested.main(["--attempts", "3", "--", "sh", "-c", f"touch {marker}; exit 4"])
    assert rc == 4
    assert len(hosts) == 2
    assert marker.exists()
    assert "attempt 2 of 3" in capsys.readouterr().err


def test_bench_wrappers_retry_in_a_fresh_nested_host() -> None:
    root = Path(__file__).resolve().parents[2]
    wrappers = [p for p in (root / "bench").iterdir() if p.is_file() and not p.suffix
                and "pymvm.nested" in p.read_text()]
    assert wrappers, "no bench wrapper runs the nested host"
    for wrapper in wrappers:
        assert "--attempts" in wrapper.read_text(), f"{wrapper.name} has no retry"


# ------------------------------------------------------------ issue 8: knobs and freeze capture


def test_nested_settings_default_to_the_setting_every_run_uses() -> None:
    settings = nested.NestedSettings.from_env({})
    assert settings == nested.NestedSettings()
    cmd = nested.vng_command(vng="vng", kernel=Path("/k"), script=Path("/t/run.sh"), rwdirs=[],
                             cwd=Path("/"), cpus=1, memory="3G", settings=settings)
    assert "--qemu-opts=-cpu EPYC,+svm" in cmd
    assert not any(arg.startswith("--qemu=") for arg in cmd)


def test_the_nested_host_runs_a_periodic_timer_unless_told_none() -> None:
    # QEMU can lose a one-shot timer's interrupt for good (docs/nested-host.md).
    assert nested.NestedSettings.from_env({}).append == "nohz=off highres=off"
    assert nested.NestedSettings.from_env({"PYMVM_NESTED_APPEND": "none"}).append == ""
    assert nested.NestedSettings.from_env({"PYMVM_NESTED_WAKE": "0"}).wake is False
    assert nested.NestedSettings.from_env({}).wake is True


def test_nested_settings_from_env_reach_qemu_and_kvm_amd(tmp_path: Path) -> None:
    settings = nested.NestedSettings.from_env({
        "PYMVM_NESTED_QEMU": "/opt/qemu10/qemu-system-x86_64",
        "PYMVM_NESTED_CPU_MODEL": "EPYC-Rome,+svm,-npt",
        "PYMVM_NESTED_TB_SIZE": "256",
        "PYMVM_NESTED_KVM_AMD": "npt=0 avic=0",
        "PYMVM_NESTED_APPEND": "nohz=off highres=off",
    })
    cmd = nested.vng_command(vng="vng", kernel=Path("/k"), script=Path("/t/run.sh"), rwdirs=[],
                             cwd=Path("/"), cpus=1, memory="3G", tcg_thread="multi",
                             monitor=Path("/t/monitor.sock"), settings=settings)
    assert ("--qemu-opts=-cpu EPYC-Rome,+svm,-npt -accel tcg,thread=multi,tb-size=256 "
            "-monitor unix:/t/monitor.sock,server=on,wait=off") in cmd
    assert "--qemu=/opt/qemu10/qemu-system-x86_64" in cmd
    assert "--append=pymvm_nested=1 nohz=off highres=off" in cmd
    script = nested.render_script(["true"], cwd=Path("/"), env={}, status_path=Path("/s"),
                                  module_params={"kvm_amd": settings.kvm_amd})
    assert "modprobe kvm_amd npt=0 avic=0 || " in script
    assert "modprobe vhost_net || " in script
    assert "pymvm.nested: kvm_amd" in script  # the values in effect are printed


@pytest.mark.parametrize("name, value, problem", [
    ("PYMVM_NESTED_TB_SIZE", "1G", "not a size in MiB"),
    ("PYMVM_NESTED_TB_SIZE", "0", "not a size in MiB"),
    ("PYMVM_NESTED_KVM_AMD", "npt=0; reboot", "not a list of module parameters"),
    ("PYMVM_NESTED_CPU_MODEL", "EPYC -smp 4", "has a space"),
    ("PYMVM_NESTED_APPEND", "nohz=off; rm -rf /", "not a list of kernel parameters"),
])
def test_nested_settings_refuse_bad_values_naming_the_variable(name: str, value: str,
                                                                problem: str) -> None:
    with pytest.raises(NestedHostError, match=f"{name}=.*{problem}"):
        nested.NestedSettings.from_env({name: value})


def test_nested_kernel_knob_refuses_a_missing_file_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "bzImage"
    with pytest.raises(NestedHostError) as err:
        nested.NestedSettings.from_env({"PYMVM_NESTED_KERNEL": str(missing)})
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"PYMVM_NESTED_KERNEL='{missing}' is not a file")
    assert "'6.12'" in message  # names the other accepted value


@pytest.fixture
def host_kernel_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache dir, and a stand-in source tarball for the 6.12 nested-host kernel's key."""
    from pymvm.images import hostkernel

    tarball = tmp_path / "linux-source-6.12.tar.xz"
    tarball.write_bytes(b"not a kernel")
    monkeypatch.setattr(hostkernel, "find_source_tarball", lambda source_dir=None: tarball)
    return tmp_path / "cache"


def test_nested_kernel_keyword_names_the_build_command_until_built(host_kernel_cache: Path) -> None:
    with pytest.raises(NestedHostError, match=r"^PYMVM_NESTED_KERNEL=6\.12: .* not built: run "
                       r"`python -m pymvm\.images\.hostkernel`"):
        nested.NestedSettings.from_env({"PYMVM_NESTED_KERNEL": "6.12",
                                        "PYMVM_CACHE_DIR": str(host_kernel_cache)})


def test_nested_kernel_keyword_is_the_cached_6_12_kernel(host_kernel_cache: Path) -> None:
    from pymvm.images import hostkernel

    folder = hostkernel.host_kernel_dir(host_kernel_cache)
    folder.mkdir(parents=True)
    for name in ("bzImage", "config", *hostkernel.BUILTIN_FILES):
        (folder / name).write_bytes(b"x")
    settings = nested.NestedSettings.from_env({"PYMVM_NESTED_KERNEL": "6.12",
                                               "PYMVM_CACHE_DIR": str(host_kernel_cache)})
    assert settings.kernel == folder / "bzImage"
    assert f"kernel={folder / 'bzImage'}" in settings.describe()
    assert "kernel=default" in nested.NestedSettings.from_env({}).describe()


def test_a_custom_kernel_gets_kvm_amd_parameters_on_its_command_line(tmp_path: Path) -> None:
    image = tmp_path / "bzImage"
    image.write_bytes(b"x")
    settings = nested.NestedSettings.from_env({"PYMVM_NESTED_KERNEL": str(image),
                                               "PYMVM_NESTED_KVM_AMD": "npt=0 nested=1"})
    cmd = nested.vng_command(vng="vng", kernel=settings.kernel, script=Path("/t/run.sh"),
                             rwdirs=[], cwd=Path("/"), cpus=1, memory="3G", settings=settings)
    assert cmd[cmd.index("--run") + 1] == str(image)
    assert ("--append=pymvm_nested=1 nohz=off highres=off kvm_amd.npt=0 kvm_amd.nested=1"
            in cmd)
    # Debian's kernel loads kvm_amd as a module: its parameters go to modprobe, not here.
    default = nested.NestedSettings.from_env({"PYMVM_NESTED_KVM_AMD": "npt=0"})
    cmd = nested.vng_command(vng="vng", kernel=Path("/k"), script=Path("/t/run.sh"), rwdirs=[],
                             cwd=Path("/"), cpus=1, memory="3G", settings=default)
    assert not any("kvm_amd." in arg for arg in cmd)


def test_a_custom_kernels_builtin_module_list_is_installed_before_modprobe() -> None:
    script = nested.render_script(["true"], cwd=Path("/"), env={}, status_path=Path("/s"),
                                  builtin_dir=Path("/cache/k"), show_kvm_amd=True)
    lines = script.splitlines()
    install = next(i for i, line in enumerate(lines) if "depmod" in line)
    assert install < next(i for i, line in enumerate(lines) if line.startswith("modprobe "))
    assert "cp /cache/k/modules.builtin /cache/k/modules.builtin.modinfo" in lines[install]
    assert f"grep -qw {nested.KERNEL_CMDLINE_MARK} /proc/cmdline" in lines[install]
    assert "modprobe kvm_amd || " in script  # no parameters: built in, they are on the cmdline
    assert "pymvm.nested: kvm_amd" in script
    assert subprocess.run(["sh", "-n"], input=script, text=True, check=False).returncode == 0


def test_run_nested_boots_the_kernel_pymvm_nested_kernel_names(
    fake_vng: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = fake_vng / "k612" / "bzImage"
    image.parent.mkdir()
    image.write_bytes(b"x")
    monkeypatch.setenv("PYMVM_NESTED_KERNEL", str(image))
    monkeypatch.setenv("PYMVM_NESTED_KVM_AMD", "npt=0")
    calls = fake_vng / "modprobe-calls"
    modprobe = fake_vng / "bin" / "modprobe"  # records what the script asks for
    modprobe.write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\n")
    assert nested.run_nested(["true"], cwd=fake_vng, output=io.BytesIO()) == 0
    args = (fake_vng / "args").read_text()
    assert f"--run {image} " in args
    assert "kvm_amd.npt=0" in args
    assert "/boot/vmlinuz-test-amd64" not in args
    assert calls.read_text().splitlines() == list(nested.NESTED_MODULES)  # no npt=0 there


def _fake_monitor(path: Path) -> "threading.Thread":
    """A UNIX socket that answers like QEMU's human monitor: banner, echo, reply, prompt."""
    import socket
    import threading

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    rips = iter(range(0x1000, 0x2000, 0x10))

    def serve() -> None:
        conn, _ = server.accept()
        with conn, server:
            conn.sendall(b"QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu) ")
            buf = b""
            while True:
                data = conn.recv(4096)
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    cmd = line.decode()
                    if cmd == "info registers":
                        answer = f"RAX=0 RIP={next(rips):016x} HLT=0"
                    elif cmd == "info status":
                        answer = "VM status: running"
                    else:
                        answer = f"answer to {cmd}"
                    conn.sendall(b"\x1b[K" + line + b"\r\n" + answer.encode() + b"\r\n(qemu) ")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_monitor_session_asks_each_command_and_keeps_the_answers(tmp_path: Path) -> None:
    sock = tmp_path / "m.sock"
    thread = _fake_monitor(sock)
    text = nested._monitor_session(sock, ["info status", "info registers", "info registers"],
                                   pause_s=0.01)
    thread.join(5)
    assert text.splitlines() == [
        "(qemu) info status", "VM status: running",
        "(qemu) info registers", "RAX=0 RIP=0000000000001000 HLT=0",
        "(qemu) info registers", "RAX=0 RIP=0000000000001010 HLT=0",
    ]


def test_capture_of_a_frozen_host_has_qemus_threads_monitor_and_stacks(tmp_path: Path) -> None:
    # A process named like QEMU in its own session stands for vng's QEMU.
    fake_qemu = tmp_path / "qemu-system-x86_64"
    fake_qemu.write_bytes(Path("/bin/sleep").read_bytes())
    fake_qemu.chmod(0o755)
    proc = subprocess.Popen([str(fake_qemu), "60"], start_new_session=True)
    sock = tmp_path / "m.sock"
    thread = _fake_monitor(sock)
    try:
        text = nested.capture_frozen_host(proc.pid, sock)
    finally:
        proc.kill()
        proc.wait()
    thread.join(5)
    assert f"QEMU pid {proc.pid}" in text
    assert "qemu-system-x86" in text and "% CPU" in text  # the thread table
    assert text.count("(qemu) info registers") == 3
    assert "(qemu) info jit" in text
    if nested.shutil.which("gdb"):
        assert "Thread 1" in text and "#0" in text
    else:
        assert "gdb is not installed" in text


def test_capture_without_qemu_or_monitor_says_what_is_missing(tmp_path: Path) -> None:
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        assert "no QEMU process found" in nested.capture_frozen_host(proc.pid, None)
    finally:
        proc.kill()
        proc.wait()


def test_run_nested_keeps_a_capture_of_a_frozen_host_under_results(
    fake_vng: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(nested, "HEARTBEAT_INTERVAL_S", 600)
    monkeypatch.setattr(nested, "FROZEN_AFTER_S", 1.0)
    monkeypatch.delenv("PYMVM_NESTED_CAPTURE_DIR", raising=False)
    rc = nested.run_nested(["sh", "-c", "echo started; exec sleep 600"], cwd=fake_vng,
                           output=io.BytesIO())
    assert rc == EXIT_TIMEOUT
    err = capsys.readouterr().err
    assert "what QEMU was doing when it was stopped" in err
    kept = list((fake_vng / "results").glob("nested-freeze-*.txt"))
    assert len(kept) == 1 and "captured at" in kept[0].read_text()
    assert str(kept[0]) in err


@pytest.mark.parametrize("wake", [True, False])
def test_a_late_heartbeat_gets_the_host_a_device_interrupt_before_it_counts_as_frozen(
    fake_vng: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    wake: bool,
) -> None:
    # One heartbeat, then none: as when QEMU lost the host's timer interrupt. A woken host
    # beats again (here: the stand-in for wake_host rewrites the heartbeat) and runs on.
    monkeypatch.setattr(nested, "HEARTBEAT_INTERVAL_S", 600)
    monkeypatch.setattr(nested, "WAKE_AFTER_S", 0.5)
    monkeypatch.setattr(nested, "FROZEN_AFTER_S", 2.5)
    if not wake:
        monkeypatch.setenv("PYMVM_NESTED_WAKE", "0")
    woken: list[Path] = []

    def fake_wake(monitor: Path) -> None:
        woken.append(monitor)
        (monitor.parent / nested.HEARTBEAT_FILE).touch()

    monkeypatch.setattr(nested, "wake_host", fake_wake)
    rc = nested.run_nested(["sh", "-c", "echo started; sleep 4; echo done"], cwd=fake_vng,
                           output=io.BytesIO())
    err = capsys.readouterr().err
    if wake:
        assert rc == 0
        assert woken and woken[0].name == nested.MONITOR_FILE
        assert err.count(nested.WOKE_NOTE) == len(woken)  # what bench/nested_soak.py counts
    else:
        assert rc == EXIT_TIMEOUT and not woken
        assert "froze: its heartbeat stopped" in err


def test_wake_host_presses_a_key_nothing_reads(tmp_path: Path) -> None:
    sock = tmp_path / "m.sock"
    thread = _fake_monitor(sock)
    assert nested.wake_host(sock).splitlines()[0] == "(qemu) sendkey shift"
    thread.join(5)


def test_a_host_that_stays_frozen_is_woken_once_then_stopped(
    fake_vng: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(nested, "HEARTBEAT_INTERVAL_S", 600)
    monkeypatch.setattr(nested, "WAKE_AFTER_S", 0.5)
    monkeypatch.setattr(nested, "FROZEN_AFTER_S", 4.0)
    woken: list[Path] = []
    monkeypatch.setattr(nested, "wake_host", woken.append)  # the host does not wake
    rc = nested.run_nested(["sh", "-c", "echo started; exec sleep 600"], cwd=fake_vng,
                           output=io.BytesIO())
    assert rc == EXIT_TIMEOUT
    assert len(woken) == 1  # one wake per late heartbeat, however long it stays late
    assert capsys.readouterr().err.count("woke its CPU") == 1
