"""The only package that touches /dev/kvm: cffi binding, thin ioctl wrappers, Kvm/Vm/Vcpu."""

from .errors import KvmCapabilityError, KvmError
from .system import Kvm, CpuidEntry
from .vm import Vm
from .vcpu import Vcpu, IoExit, MmioExit, EXIT_INTERRUPTED, FastRead, FastReadTable
from ._kvm_cffi import lib as constants

__all__ = [
    "Kvm", "Vm", "Vcpu", "CpuidEntry", "IoExit", "MmioExit", "KvmError", "KvmCapabilityError",
    "EXIT_INTERRUPTED", "FastRead", "FastReadTable", "constants",
]
