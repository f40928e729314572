"""cffi build module for the x86 Linux boot protocol structures (API mode).

``struct boot_params`` and ``struct setup_header`` come from the system's
<asm/bootparam.h>: field offsets are the compiler's, not hand-computed.
"""

from cffi import FFI

CDEF = r"""
typedef uint8_t __u8;
typedef uint16_t __u16;
typedef uint32_t __u32;
typedef unsigned long long __u64;

struct setup_header {
    __u8 setup_sects; __u16 root_flags; __u32 syssize; __u16 ram_size; __u16 vid_mode;
    __u16 root_dev; __u16 boot_flag; __u16 jump; __u32 header; __u16 version;
    __u32 realmode_swtch; __u16 start_sys_seg; __u16 kernel_version; __u8 type_of_loader;
    __u8 loadflags; __u16 setup_move_size; __u32 code32_start; __u32 ramdisk_image;
    __u32 ramdisk_size; __u32 bootsect_kludge; __u16 heap_end_ptr; __u8 ext_loader_ver;
    __u8 ext_loader_type; __u32 cmd_line_ptr; __u32 initrd_addr_max; __u32 kernel_alignment;
    __u8 relocatable_kernel; __u8 min_alignment; __u16 xloadflags; __u32 cmdline_size;
    __u32 hardware_subarch; __u64 hardware_subarch_data; __u32 payload_offset;
    __u32 payload_length; __u64 setup_data; __u64 pref_address; __u32 init_size;
    __u32 handover_offset; __u32 kernel_info_offset; ...;
};

struct boot_e820_entry { __u64 addr; __u64 size; __u32 type; ...; };

struct boot_params {
    __u32 ext_ramdisk_image; __u32 ext_ramdisk_size; __u32 ext_cmd_line_ptr;
    __u8 e820_entries;
    struct setup_header hdr;
    struct boot_e820_entry e820_table[...];
    ...;
};

#define E820_MAX_ENTRIES_ZEROPAGE ...
#define LOADED_HIGH ...
#define KEEP_SEGMENTS ...
#define CAN_USE_HEAP ...
#define XLF_KERNEL_64 ...
#define XLF_CAN_BE_LOADED_ABOVE_4G ...

#define PYMVM_SETUP_HEADER_OFFSET ...
#define PYMVM_E820_RAM ...
#define PYMVM_E820_RESERVED ...
"""

SOURCE = r"""
#include <stddef.h>
#include <stdint.h>
#include <asm/bootparam.h>

/* Offset of the setup header inside both the zero page and the bzImage file (0x1f1). */
#define PYMVM_SETUP_HEADER_OFFSET offsetof(struct boot_params, hdr)
/* E820 types are not in the uapi headers; values from the boot protocol (ACPI spec). */
#define PYMVM_E820_RAM 1
#define PYMVM_E820_RESERVED 2
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("pymvm.boot._bootparam_cffi", SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
