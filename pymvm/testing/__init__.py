"""Integration testing with pymvm: boot a Linux guest, run commands, move files.

    from pymvm.testing import MicroVM
    with MicroVM(vcpus=2, memory_mib=256) as vm:
        result = vm.run("uname -r")
        assert result.returncode == 0

The pytest plugin (``pymvm.testing.plugin``, registered through the ``pytest11`` entry point)
gives tests the ``microvm`` and ``microvm_factory`` fixtures. Names are imported lazily: the
plugin is loaded by every pytest run and must cost nothing until a test uses a VM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .agent import AgentError, CommandFailed, RunResult
    from .vm import AgentGone, GuestNotReady, MicroVM, MicroVMError, VmmDied

__all__ = ["MicroVM", "RunResult", "MicroVMError", "GuestNotReady", "VmmDied", "AgentGone",
           "AgentError", "CommandFailed"]

_WHERE = {"MicroVM": "vm", "MicroVMError": "vm", "GuestNotReady": "vm", "VmmDied": "vm",
          "AgentGone": "vm", "RunResult": "agent", "AgentError": "agent",
          "CommandFailed": "agent"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        module = importlib.import_module(f"{__name__}.{_WHERE[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
