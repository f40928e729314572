#!/bin/sh
# /init of the pymvm test initramfs (busybox). A template: pymvm/images/initramfs.py fills in
# the placeholders (names between double at-signs) from pymvm.layout before packing it.
#
# Contract (everything is read from /proc/cmdline):
#   1. mounts proc, sysfs, devtmpfs on /dev, tmpfs on /tmp and /run, then loads the kernel
#      modules listed in /etc/pymvm-modules, in order (`pymvm build-initramfs --modules`);
#   2. for each `pymvm.net=IFACE,ADDR/PREFIX[,GATEWAY]`: brings lo and IFACE up, adds ADDR,
#      and a default route via GATEWAY if given;
#   3. starts the guest agent (/sbin/pymvm-agent, docs/agent.md) in the background on vsock
#      port `pymvm.agent_port=N` (default @@AGENT_PORT@@);
#   4. writes @@BOOT_TIMER_MAGIC@@ to the boot timer at @@BOOT_TIMER_ADDR@@ (devmem), then
#      prints `@@READY_MARKER@@ cpus=<online CPUs>` on its own line;
#   5. `pymvm.cmd=<base64>`: runs the decoded command with `sh -c` (stdin /dev/null, output
#      on the console), then prints `@@EXIT_MARKER@@ <exit status>` on its own line;
#      else with `pymvm.shell=1`: an interactive shell on the console until it exits;
#      else with `pymvm.agent=1` or a virtio-vsock device (id 0x0013): waits for the agent
#      (the VM runs until stopped from outside or a command run through the agent reboots it);
#   6. sync, then `reboot -f` (the VMM sees the reset: i8042 with reboot=k, triple fault
#      with reboot=t). Should reboot fail, init exits and the kernel panics (use panic=-1).
#      Under QEMU microvm use reboot=t or add `-device i8042`: reboot=k with no i8042 falls
#      back to a BIOS restart, which qboot turns into a fresh boot, forever.

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root

mount -t proc proc /proc
mount -t sysfs sysfs /sys
# CONFIG_DEVTMPFS_MOUNT does not apply to an initramfs root, but tolerate it being mounted.
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
# Late kernel messages would break the marker lines apart; emergencies still print.
dmesg -n 1

# Modules of a distribution kernel (dependencies first): virtio-mmio finds its devices in
# the ACPI tables as it loads, so eth0 exists once virtio_net is in.
if [ -f /etc/pymvm-modules ]; then
    while read -r module; do
        insmod "$module" || echo "pymvm-init: insmod $module failed"
    done < /etc/pymvm-modules
fi

nets=
cmd_b64=
shell=0
agent_port=@@AGENT_PORT@@
agent_wait=0
set -f  # split the command line on blanks, but never glob its words
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        pymvm.net=*) nets="$nets ${arg#pymvm.net=}" ;;
        pymvm.cmd=*) cmd_b64="${arg#pymvm.cmd=}" ;;
        pymvm.shell=1) shell=1 ;;
        pymvm.agent=1) agent_wait=1 ;;
        pymvm.agent_port=*) agent_port="${arg#pymvm.agent_port=}" ;;
    esac
done
set +f

ip link set lo up
for spec in $nets; do
    old_ifs=$IFS
    IFS=,
    set -- $spec
    IFS=$old_ifs
    if ip link set "$1" up && ip addr add "$2" dev "$1"; then
        if [ -n "$3" ]; then
            ip route add default via "$3" dev "$1" || echo "pymvm-init: no default route via $3"
        fi
    else
        echo "pymvm-init: could not configure $1 with $2"
    fi
done

# The guest agent serves commands and files over vsock from now on (one process per client).
agent_pid=
if [ -x /sbin/pymvm-agent ]; then
    /sbin/pymvm-agent --port "$agent_port" </dev/null &
    agent_pid=$!
fi

cpus=$(grep -c ^processor /proc/cpuinfo)
devmem @@BOOT_TIMER_ADDR@@ 8 @@BOOT_TIMER_MAGIC@@ || echo "pymvm-init: boot timer write failed"
echo "@@READY_MARKER@@ cpus=$cpus"

if [ -n "$cmd_b64" ]; then
    if cmd=$(printf '%s' "$cmd_b64" | base64 -d); then
        sh -c "$cmd" </dev/null
        rc=$?
    else
        echo "pymvm-init: pymvm.cmd is not valid base64"
        rc=127
    fi
    echo "@@EXIT_MARKER@@ $rc"
elif [ "$shell" = 1 ]; then
    setsid cttyhack sh
elif [ -n "$agent_pid" ] && { [ "$agent_wait" = 1 ] || grep -qsx 0x0013 /sys/bus/virtio/devices/*/device; }; then
    wait "$agent_pid"
    echo "pymvm-init: the guest agent exited"
fi

sync
reboot -f
