"""pytest plugin (entry point ``pytest11``: ``pymvm``): the ``microvm`` and
``microvm_factory`` fixtures, ``--pymvm-kernel``/``--pymvm-initrd`` options, and on failure
each VM's console and VMM log attached to the report.

Loaded by every pytest run once pymvm is installed: it imports nothing of pymvm until a test
asks for a fixture.
"""

from __future__ import annotations

import pytest

NESTED_HINT = "python -m pymvm.nested -- pytest ..."
REPORT_CONSOLE_LINES = 200
REPORT_LOG_LINES = 100


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pymvm", "pymvm microVM fixtures")
    group.addoption("--pymvm-kernel", default=None, metavar="PATH",
                    help="guest kernel for the microvm fixtures (default: pymvm build-kernel's)")
    group.addoption("--pymvm-initrd", default=None, metavar="PATH",
                    help="initramfs with the guest agent (default: pymvm build-initramfs's)")
    group.addoption("--pymvm-boot-timeout", default=None, type=float, metavar="SECONDS",
                    help="how long a guest may take to reach its agent (default 240)")


def _skip_unless_linux_boots() -> None:
    from pymvm.nested import can_boot_linux_here

    ok, why = can_boot_linux_here()
    if not ok:
        pytest.skip(f"this host cannot boot Linux guests ({why}); run the tests in the nested "
                    f"KVM host: {NESTED_HINT}")


@pytest.fixture
def microvm_factory(request: pytest.FixtureRequest):
    """Starts MicroVMs: ``vm = microvm_factory(vcpus=2, net=[...])``; all are stopped after
    the test. Keyword arguments are MicroVM's."""
    _skip_unless_linux_boots()
    from pymvm.testing.vm import MicroVM

    config = request.config
    defaults = {"kernel": config.getoption("--pymvm-kernel"),
                "initrd": config.getoption("--pymvm-initrd")}
    timeout = config.getoption("--pymvm-boot-timeout")
    if timeout is not None:
        defaults["boot_timeout"] = timeout
    vms: list[MicroVM] = []
    request.node._pymvm_vms = vms

    def make(**kwargs) -> MicroVM:
        options = {k: v for k, v in defaults.items() if v is not None}
        options.update(kwargs)
        vm = MicroVM(**options)
        vms.append(vm)  # before start(): a VM that fails to boot is reported too
        vm.start()
        return vm

    yield make
    for vm in reversed(vms):
        vm.close()


@pytest.fixture
def microvm(microvm_factory):
    """One running MicroVM (1 vCPU, 256 MiB) for this test."""
    return microvm_factory()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    vms = getattr(item, "_pymvm_vms", None)
    if not vms or not report.failed:
        return
    for vm in vms:
        console = "\n".join(vm.console.rstrip().splitlines()[-REPORT_CONSOLE_LINES:])
        log = "\n".join(vm.vmm_log.rstrip().splitlines()[-REPORT_LOG_LINES:])
        report.sections.append((f"pymvm {vm.id} console", console or "(empty)"))
        report.sections.append((f"pymvm {vm.id} VMM log", log or "(empty)"))
