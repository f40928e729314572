"""Guest physical address map and IRQ numbers of a pymvm x86_64 VM.

    0x0000_0500  GDT                     0x0000_7000  boot_params (zero page)
    0x0000_8ff0  boot stack top          0x0000_9000  PML4, then PDPT and 4 PDs
    0x0002_0000  kernel command line     0x0009_fc00  MP table (in the EBDA)
    0x000e_0000  ACPI tables (RSDP first, in the BIOS area Linux scans), e820-reserved
    0x0010_0000  kernel (HIMEM_START)    ...          initrd at the top of low RAM
    0xd000_0000  32-bit MMIO hole: boot timer, then one page per virtio-mmio device
    0xfec0_0000  IOAPIC, 0xfee0_0000 LAPIC (inside the hole, emulated by KVM)
    0x1_0000_0000 RAM above 4 GiB for guests larger than the hole's start
"""

GDT_START = 0x500
IDT_START = 0x520
ZERO_PAGE_START = 0x7000
BOOT_STACK_POINTER = 0x8FF0
PML4_START = 0x9000
PDPT_START = 0xA000
PD_START = 0xB000  # four pages: identity map of the first 4 GiB in 2 MiB pages
CMDLINE_START = 0x20000
CMDLINE_MAX_SIZE = 0x10000
EBDA_START = 0x9FC00
MPTABLE_START = EBDA_START
HIMEM_START = 0x100000
# ACPI tables (pymvm.boot.acpi): the RSDP must lie in 0xE0000-0xFFFFF for Linux's legacy scan.
ACPI_TABLES_START = 0xE0000
ACPI_TABLES_SIZE = 0x20000
ACPI_RSDP_ADDR = ACPI_TABLES_START

MMIO_HOLE_START = 0xD000_0000
MMIO_HOLE_END = 0x1_0000_0000
BOOT_TIMER_ADDR = MMIO_HOLE_START  # guest writes BOOT_TIMER_MAGIC here
BOOT_TIMER_SIZE = 0x1000
BOOT_TIMER_MAGIC = 123
VIRTIO_MMIO_START = MMIO_HOLE_START + 0x1000
VIRTIO_MMIO_SIZE = 0x1000  # one page per device
KVM_TSS_ADDR = 0xFFFB_D000  # three pages, below the BIOS area, inside the hole
KVM_IDENTITY_MAP_ADDR = 0xFFFB_C000
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000

# Legacy ISA IRQs, and the IOAPIC pins handed to virtio-mmio devices in order.
SERIAL_IRQ = 4
I8042_IRQ = 1
VIRTIO_IRQ_BASE = 5
VIRTIO_IRQ_MAX = 23

COM1_PORT = 0x3F8
I8042_DATA_PORT = 0x60
I8042_CMD_PORT = 0x64
# ACPI hardware-reduced power management (pymvm.devices.acpi_pm): the FADT's sleep
# control/status registers and reset register, one byte each.
ACPI_PM_PORT = 0x600
ACPI_SLEEP_CONTROL_PORT = ACPI_PM_PORT
ACPI_SLEEP_STATUS_PORT = ACPI_PM_PORT + 1
ACPI_RESET_PORT = ACPI_PM_PORT + 2
ACPI_PM_PORT_COUNT = 3
ACPI_RESET_VALUE = 0x01
