"""Virtio constants (virtio 1.2 spec).

Names follow Linux's uapi headers so that tests/unit/test_virtio_mmio.py can check every value
against <linux/virtio_*.h>; the few that Linux does not define are listed in PYMVM_ONLY.
Feature constants are bit *numbers*, as in Linux; use ``feature_mask()`` to build masks.
"""

from __future__ import annotations

# <linux/virtio_ids.h>
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_RNG = 4
VIRTIO_ID_VSOCK = 19

# <linux/virtio_config.h>: device status bits (spec 2.1)
VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80

# <linux/virtio_config.h>: device-independent feature bits (spec 6)
VIRTIO_TRANSPORT_F_START = 28
VIRTIO_TRANSPORT_F_END = 41
VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_ORDER_PLATFORM = 36
VIRTIO_F_SR_IOV = 37
VIRTIO_F_RING_RESET = 40

# <linux/virtio_ring.h>
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VRING_DESC_ALIGN_SIZE = 16
VRING_AVAIL_ALIGN_SIZE = 2
VRING_USED_ALIGN_SIZE = 4

# <linux/virtio_mmio.h>: register offsets of the version-2 ("modern") layout (spec 4.2.2)
VIRTIO_MMIO_MAGIC_VALUE = 0x000
VIRTIO_MMIO_VERSION = 0x004
VIRTIO_MMIO_DEVICE_ID = 0x008
VIRTIO_MMIO_VENDOR_ID = 0x00C
VIRTIO_MMIO_DEVICE_FEATURES = 0x010
VIRTIO_MMIO_DEVICE_FEATURES_SEL = 0x014
VIRTIO_MMIO_DRIVER_FEATURES = 0x020
VIRTIO_MMIO_DRIVER_FEATURES_SEL = 0x024
VIRTIO_MMIO_QUEUE_SEL = 0x030
VIRTIO_MMIO_QUEUE_NUM_MAX = 0x034
VIRTIO_MMIO_QUEUE_NUM = 0x038
VIRTIO_MMIO_QUEUE_READY = 0x044
VIRTIO_MMIO_QUEUE_NOTIFY = 0x050
VIRTIO_MMIO_INTERRUPT_STATUS = 0x060
VIRTIO_MMIO_INTERRUPT_ACK = 0x064
VIRTIO_MMIO_STATUS = 0x070
VIRTIO_MMIO_QUEUE_DESC_LOW = 0x080
VIRTIO_MMIO_QUEUE_DESC_HIGH = 0x084
VIRTIO_MMIO_QUEUE_AVAIL_LOW = 0x090  # spec name: QueueDriverLow
VIRTIO_MMIO_QUEUE_AVAIL_HIGH = 0x094
VIRTIO_MMIO_QUEUE_USED_LOW = 0x0A0  # spec name: QueueDeviceLow
VIRTIO_MMIO_QUEUE_USED_HIGH = 0x0A4
VIRTIO_MMIO_SHM_SEL = 0x0AC
VIRTIO_MMIO_SHM_LEN_LOW = 0x0B0
VIRTIO_MMIO_SHM_LEN_HIGH = 0x0B4
VIRTIO_MMIO_SHM_BASE_LOW = 0x0B8
VIRTIO_MMIO_SHM_BASE_HIGH = 0x0BC
VIRTIO_MMIO_CONFIG_GENERATION = 0x0FC
VIRTIO_MMIO_CONFIG = 0x100
VIRTIO_MMIO_INT_VRING = 1 << 0  # InterruptStatus: used buffer notification
VIRTIO_MMIO_INT_CONFIG = 1 << 1  # InterruptStatus: configuration change

# <linux/virtio_net.h>: feature bits (spec 5.1.3)
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 2
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_MQ = 22
# <linux/virtio_net.h>: virtio_net_config.status bits
VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_S_ANNOUNCE = 2

# pymvm's own values, not in Linux's headers (spec 4.2.2).
VIRTIO_MMIO_MAGIC = 0x74726976  # "virt" read as a little-endian u32
VIRTIO_MMIO_VERSION_MODERN = 2
VIRTIO_MMIO_REGISTERS_END = VIRTIO_MMIO_CONFIG  # registers below, device config at and above
VIRTIO_MMIO_PAGE_SIZE = 0x1000
PYMVM_VIRTIO_VENDOR_ID = int.from_bytes(b"PYMV", "little")  # like QEMU's "QEMU", 0x554D4551
VIRTIO_NET_CONFIG_SIZE = 12  # mac[6], status, max_virtqueue_pairs, mtu (u16 each)
VIRTIO_NET_ETH_ALEN = 6

PYMVM_ONLY = frozenset(
    {
        "VIRTIO_MMIO_MAGIC",
        "VIRTIO_MMIO_VERSION_MODERN",
        "VIRTIO_MMIO_REGISTERS_END",
        "VIRTIO_MMIO_PAGE_SIZE",
        "PYMVM_VIRTIO_VENDOR_ID",
        "VIRTIO_NET_CONFIG_SIZE",
        "VIRTIO_NET_ETH_ALEN",
    }
)

# Driver progress bits in the order the driver must set them (spec 3.1.1).
STATUS_PROGRESS_ORDER = (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_DRIVER_OK,
)


def feature_mask(*bits: int) -> int:
    """The 64-bit feature mask with the given feature bit numbers set."""
    mask = 0
    for bit in bits:
        mask |= 1 << bit
    return mask
