#!/bin/sh
# /etc/outpost/boot.sh — sysinit of the Outpost disk image: mounts the pseudo file systems,
# loads the drivers listed in /etc/outpost/modules.order, mounts the boot partition (label
# OUTPOSTBOOT, read-only) and the data partition (label OUTPOSTDATA) at /var/lib/outpost,
# copies the agent settings from the boot partition to /run/outpost and brings up the network.
# Nothing here needs the network or the control service: the agent boots from its own cache.
export PATH=/bin:/sbin:/usr/bin
say() { echo "outpost-boot: $*" >/dev/console; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /run /tmp /sys/fs/cgroup /boot /var/lib/outpost
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null || say "cgroup v2 unavailable: workloads run without resource limits"
say "kernel $(uname -r), up $(cut -d' ' -f1 /proc/uptime) s"

while read -r module; do
    [ -n "$module" ] || continue
    insmod "/lib/modules/$module.ko" 2>/dev/null || say "could not load module $module"
done </etc/outpost/modules.order

# Waits up to 20 s for a partition with the label, prints its device.
find_partition() {
    tries=0
    while [ "$tries" -lt 100 ]; do
        device="$(findfs "LABEL=$1" 2>/dev/null)" && { echo "$device"; return 0; }
        tries=$((tries + 1))
        sleep 0.2
    done
    return 1
}

mkdir -p /run/outpost
chmod 0700 /run/outpost
: >/run/outpost/agent.env
if boot_device="$(find_partition OUTPOSTBOOT)" && mount -t vfat -o ro,fmask=0177,dmask=0077 "$boot_device" /boot; then
    say "boot partition $boot_device"
    # Settings: KEY=VALUE lines; only OUTPOST_* keys are kept, carriage returns are dropped
    # (the file may have been edited on another OS). Never sourced: it is data, not a script.
    if [ -f /boot/outpost/agent.env ]; then
        tr -d '\r' </boot/outpost/agent.env | while IFS= read -r line || [ -n "$line" ]; do
            case "$line" in ''|'#'*) continue ;; esac
            key="${line%%=*}"
            case "$key" in
                OUTPOST_*) case "$key" in *[!A-Z0-9_]*) say "ignoring setting with a bad name: $key"; continue ;; esac ;;
                *) say "ignoring setting $key (only OUTPOST_* settings are read)"; continue ;;
            esac
            printf '%s\n' "$line"
        done >/run/outpost/agent.env
    fi
    if [ -f /boot/outpost/enrollment-token ] && ! grep -q '^OUTPOST_ENROLL_TOKEN=' /run/outpost/agent.env; then
        printf 'OUTPOST_ENROLL_TOKEN=%s\n' "$(tr -d ' \t\r\n' </boot/outpost/enrollment-token)" >>/run/outpost/agent.env
    fi
    [ -f /boot/outpost/hostname ] && hostname "$(tr -d ' \t\r\n' </boot/outpost/hostname)"
    [ -f /boot/outpost/network.env ] && tr -d '\r' </boot/outpost/network.env >/run/outpost/network.env
else
    say "no boot partition labelled OUTPOSTBOOT: running with built-in defaults"
fi

if data_device="$(find_partition OUTPOSTDATA)" && mount -t ext4 -o noatime "$data_device" /var/lib/outpost; then
    say "data partition $data_device mounted at /var/lib/outpost"
else
    mount -t tmpfs -o mode=0700 tmpfs /var/lib/outpost
    say "WARNING: no ext4 data partition labelled OUTPOSTDATA; /var/lib/outpost is in memory and is lost at reboot"
fi
chmod 0700 /var/lib/outpost

# Network: OUTPOST_NET=dhcp (default) or static with OUTPOST_NET_ADDRESS (CIDR) and
# OUTPOST_NET_GATEWAY, read from network.env on the boot partition.
net_mode=dhcp
net_address=""
net_gateway=""
net_interface=eth0
if [ -f /run/outpost/network.env ]; then
    while IFS='=' read -r key value; do
        case "$key" in
            OUTPOST_NET) net_mode="$value" ;;
            OUTPOST_NET_ADDRESS) net_address="$value" ;;
            OUTPOST_NET_GATEWAY) net_gateway="$value" ;;
            OUTPOST_NET_INTERFACE) net_interface="$value" ;;
        esac
    done </run/outpost/network.env
fi
ip link set lo up
if [ "$(hostname)" = "(none)" ]; then
    mac="$(cat "/sys/class/net/$net_interface/address" 2>/dev/null | tr -d ':' | cut -c7-12)"
    hostname "outpost-${mac:-node}"
fi
if ip link set "$net_interface" up 2>/dev/null; then
    case "$net_mode" in
        static)
            ip addr add "$net_address" dev "$net_interface" || say "could not set address '$net_address'"
            if [ -n "$net_gateway" ]; then
                ip route add default via "$net_gateway" dev "$net_interface" || say "could not set gateway '$net_gateway'"
            fi
            say "network $net_interface static $net_address via ${net_gateway:-none}"
            ;;
        *)
            # In the background and retrying forever: a box without a DHCP server still boots
            # and runs its workloads from the cache; the agent finds control once a lease comes.
            udhcpc -i "$net_interface" -s /etc/outpost/udhcpc.sh -f -T 2 -t 5 -A 5 >/dev/null 2>&1 &
            say "network $net_interface dhcp started"
            ;;
    esac
else
    say "no network interface $net_interface: offline"
fi
say "hostname $(hostname); sysinit done at $(cut -d' ' -f1 /proc/uptime) s"
