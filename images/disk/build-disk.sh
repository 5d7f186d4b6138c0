#!/usr/bin/env bash
# images/disk/build-disk.sh — builds a bootable x86_64 disk image (raw, plus qcow2) for an
# Outpost edge box, without root, loop devices or a container engine.
#
#   images/disk/build-disk.sh [--out DIR] [--agent PATH] [--control PATH] [--agent-env FILE]
#                             [--enroll-token-file FILE] [--network-env FILE] [--hostname NAME]
#                             [--data-size-mib N]
#
# Layout (MBR):
#   partition 1  FAT16, label OUTPOSTBOOT, bootable: syslinux, the Debian kernel (vmlinuz),
#                initrd.img (busybox-static init, the static agent, the static
#                outpost-control the agent runs when the box leads (D6), the drivers it needs,
#                and the wireguard module: the agent drives kernel WireGuard over netlink, so
#                the overlay needs no `ip`, `wg` or userspace daemon on this image) and
#                outpost/agent.env, outpost/enrollment-token, outpost/network.env, outpost/hostname
#                — the files an operator edits on any computer before the first boot.
#   partition 2  ext4, label OUTPOSTDATA: /var/lib/outpost (redb store, last-good plan, logs).
# The kernel comes from Debian's linux-image-amd64 and busybox from busybox-static, both fetched
# with `apt-get download` and unpacked with `dpkg-deb -x`: nothing is installed on this host.
# Prints the path of the raw image on stdout.
set -euo pipefail
source "$(dirname "$0")/../../cross/lib.sh"

disk_dir="$OUTPOST_ROOT/images/disk"
out_dir="$(outpost_target_dir)/images/disk"
agent=""
control=""
agent_env=""
token_file=""
network_env=""
node_hostname=""
data_size_mib=128
boot_size_mib=64
while (($#)); do
    case "$1" in
        --out) out_dir="$2"; shift 2 ;;
        --agent) agent="$2"; shift 2 ;;
        --control) control="$2"; shift 2 ;;
        --agent-env) agent_env="$2"; shift 2 ;;
        --enroll-token-file) token_file="$2"; shift 2 ;;
        --network-env) network_env="$2"; shift 2 ;;
        --hostname) node_hostname="$2"; shift 2 ;;
        --data-size-mib) data_size_mib="$2"; shift 2 ;;
        -h|--help) sed -n '2,21p' "$0" >&2; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ "$data_size_mib" =~ ^[0-9]+$ ]] && ((data_size_mib >= 16)) || die "--data-size-mib must be a number >= 16, got '$data_size_mib'"
for file in "$agent_env" "$token_file" "$network_env"; do
    [[ -z "$file" || -f "$file" ]] || die "file '$file' does not exist"
done

ensure_apt_packages syslinux syslinux-common mtools dosfstools fdisk e2fsprogs kmod cpio gzip \
    ca-certificates python3 qemu-utils
[[ -n "$agent" ]] || agent="$("$OUTPOST_ROOT/cross/build" x86_64-unknown-linux-musl --release)"
verify_static_binary x86_64-unknown-linux-musl "$agent"
[[ -n "$control" ]] || control="$("$OUTPOST_ROOT/cross/build" x86_64-unknown-linux-musl --release --bin outpost-control)"
verify_static_binary x86_64-unknown-linux-musl "$control"

mkdir -p "$out_dir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# --- Debian packages: kernel and busybox-static, downloaded once into a cache --------------
deb_cache="$(outpost_target_dir)/images/debs"
mkdir -p "$deb_cache"
kernel_package="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')"
[[ -n "$kernel_package" ]] || die "apt-cache does not know linux-image-amd64 (run apt-get update)"
fetch_deb() {
    local package="$1" found
    found="$(find "$deb_cache" -maxdepth 1 -name "${package}_*.deb" | head -n1)"
    if [[ -z "$found" ]]; then
        log "apt-get download $package"
        (cd "$deb_cache" && apt-get download "$package" >/dev/null 2>&1) || die "apt-get download $package failed"
        found="$(find "$deb_cache" -maxdepth 1 -name "${package}_*.deb" | head -n1)"
    fi
    [[ -n "$found" ]] || die "no .deb for $package in $deb_cache"
    echo "$found"
}
kernel_deb="$(fetch_deb "$kernel_package")"
busybox_deb="$(fetch_deb busybox-static)"
dpkg-deb -x "$kernel_deb" "$work/kernel"
dpkg-deb -x "$busybox_deb" "$work/busybox"
kernel_version="$(ls "$work/kernel/lib/modules")"
vmlinuz="$work/kernel/boot/vmlinuz-$kernel_version"
[[ -f "$vmlinuz" ]] || die "no vmlinuz in $kernel_deb"
log "kernel $kernel_version from $(basename "$kernel_deb"), busybox from $(basename "$busybox_deb")"

# --- initramfs: busybox init, the agent, drivers ----------------------------------------
initrd_root="$work/initrd"
mkdir -p "$initrd_root"/{bin,sbin,usr/bin,etc/ssl/certs,proc,sys,dev,run,tmp,boot,var/lib/outpost,lib/modules}
cp -a "$disk_dir/rootfs/." "$initrd_root/"
install -m 0755 "$work/busybox/bin/busybox" "$initrd_root/bin/busybox"
for applet in $("$initrd_root/bin/busybox" --list); do
    [[ "$applet" == busybox ]] && continue
    [[ -e "$initrd_root/bin/$applet" ]] || ln -s busybox "$initrd_root/bin/$applet"
done
ln -sf ../bin/busybox "$initrd_root/sbin/init"
ln -sf bin/busybox "$initrd_root/init"
install -m 0755 "$agent" "$initrd_root/usr/bin/outpost-agent"
install -m 0755 "$control" "$initrd_root/usr/bin/outpost-control"
install -m 0644 /etc/ssl/certs/ca-certificates.crt "$initrd_root/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$initrd_root/etc/passwd"
printf 'root:x:0:\n' >"$initrd_root/etc/group"

# Drivers the Debian kernel builds as modules and the image needs: virtio disk and network
# (QEMU and most clouds), e1000 (older virtual NICs), ext4 for the data partition, vfat for
# the boot partition, and wireguard for the overlay (with its crypto and UDP-tunnel modules,
# ~0.57 MB before gzip). Dependencies are resolved from depmod's modules.dep, loaded first.
depmod -b "$work/kernel" "$kernel_version"
wanted_modules="virtio_pci virtio_blk virtio_net e1000 crc32c_generic ext4 vfat nls_cp437 nls_iso8859-1 nls_ascii wireguard"
python3 - "$work/kernel/lib/modules/$kernel_version" "$initrd_root" $wanted_modules <<'PY'
"""Copies the wanted modules and their dependencies; writes etc/outpost/modules.order."""
import os, shutil, sys

modules_dir, initrd_root, wanted = sys.argv[1], sys.argv[2], sys.argv[3:]
deps = {}
for line in open(os.path.join(modules_dir, "modules.dep")):
    path, _, rest = line.strip().partition(":")
    deps[path] = rest.split()
by_name = {os.path.basename(p)[: -len(".ko")].replace("-", "_"): p for p in deps}
order, seen = [], set()

def visit(path):
    if path in seen:
        return
    seen.add(path)
    for dep in deps[path]:
        visit(dep)
    order.append(path)

for name in wanted:
    key = name.replace("-", "_")
    if key not in by_name:
        sys.exit(f"module {name} is not in this kernel's modules.dep (built in or missing)")
    visit(by_name[key])
names = []
for path in order:
    name = os.path.basename(path)[: -len(".ko")]
    shutil.copyfile(os.path.join(modules_dir, path), os.path.join(initrd_root, "lib", "modules", name + ".ko"))
    names.append(name)
with open(os.path.join(initrd_root, "etc", "outpost", "modules.order"), "w") as handle:
    handle.write("\n".join(names) + "\n")
print(f"{len(names)} modules: {' '.join(names)}", file=sys.stderr)
PY

# Deterministic cpio: sorted names, mtime 0, owner 0:0.
find "$initrd_root" -exec touch -h -d @0 {} +
(cd "$initrd_root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible) |
    gzip -9 -n >"$work/initrd.img"
log "initrd.img $(stat -c %s "$work/initrd.img") B gzip -9 ($(du -sb --apparent-size "$initrd_root" | cut -f1) B unpacked: outpost-agent $(stat -c %s "$initrd_root/usr/bin/outpost-agent") B, outpost-control $(stat -c %s "$initrd_root/usr/bin/outpost-control") B, busybox $(stat -c %s "$initrd_root/bin/busybox") B, modules $(du -sb --apparent-size "$initrd_root/lib/modules" | cut -f1) B); vmlinuz $(stat -c %s "$vmlinuz") B"

# --- boot partition (FAT16): syslinux, kernel, initrd, settings ---------------------------
boot_img="$work/boot.img"
truncate -s "${boot_size_mib}M" "$boot_img"
mkfs.vfat -F 16 -n OUTPOSTBOOT -i 0b0075a5 --invariant "$boot_img" >/dev/null
export MTOOLS_SKIP_CHECK=1
mmd -i "$boot_img" ::/syslinux
syslinux --install --directory /syslinux "$boot_img"
mdir -a -i "$boot_img" ::/syslinux | grep -qi 'ldlinux' || die "syslinux did not install ldlinux into the boot partition"
cat >"$work/syslinux.cfg" <<'CFG'
DEFAULT outpost
PROMPT 0
TIMEOUT 0
LABEL outpost
    LINUX /vmlinuz
    INITRD /initrd.img
    APPEND console=tty0 console=ttyS0,115200 panic=10 quiet rdinit=/init
CFG
mcopy -i "$boot_img" "$work/syslinux.cfg" ::/syslinux/syslinux.cfg
mcopy -i "$boot_img" "$vmlinuz" ::/vmlinuz
mcopy -i "$boot_img" "$work/initrd.img" ::/initrd.img
mmd -i "$boot_img" ::/outpost
if [[ -n "$agent_env" ]]; then
    mcopy -i "$boot_img" "$agent_env" ::/outpost/agent.env
else
    printf '# outpost-agent settings (KEY=VALUE): OUTPOST_CONTROL_URL, OUTPOST_ENROLL_TOKEN, ...\n' >"$work/agent.env"
    mcopy -i "$boot_img" "$work/agent.env" ::/outpost/agent.env
fi
[[ -z "$token_file" ]] || mcopy -i "$boot_img" "$token_file" ::/outpost/enrollment-token
[[ -z "$network_env" ]] || mcopy -i "$boot_img" "$network_env" ::/outpost/network.env
if [[ -n "$node_hostname" ]]; then
    printf '%s\n' "$node_hostname" >"$work/hostname"
    mcopy -i "$boot_img" "$work/hostname" ::/outpost/hostname
fi

# --- data partition (ext4), made from an empty directory without mounting ---------------
data_img="$work/data.img"
mkdir -p "$work/data-root"
chmod 0700 "$work/data-root"
truncate -s "${data_size_mib}M" "$data_img"
mkfs.ext4 -q -F -L OUTPOSTDATA -U 0c0ffee0-0000-4000-8000-00000000da7a -E root_owner=0:0 \
    -d "$work/data-root" "$data_img" "${data_size_mib}M"

# --- the disk: MBR with syslinux's boot code, two partitions ------------------------------
disk="$out_dir/outpost-x86_64.img"
rm -f "$disk"
total_mib=$((1 + boot_size_mib + data_size_mib))
truncate -s "${total_mib}M" "$disk"
sfdisk --quiet "$disk" <<PARTS
label: dos
label-id: 0x0b0075a5
unit: sectors
start=2048, size=$((boot_size_mib * 2048)), type=e, bootable
start=$((2048 + boot_size_mib * 2048)), size=$((data_size_mib * 2048)), type=83
PARTS
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$disk" bs=440 count=1 conv=notrunc status=none
dd if="$boot_img" of="$disk" bs=1M seek=1 conv=notrunc status=none
dd if="$data_img" of="$disk" bs=1M seek=$((1 + boot_size_mib)) conv=notrunc status=none
qemu-img convert -f raw -O qcow2 "$disk" "$out_dir/outpost-x86_64.qcow2"
log "disk image $disk ($(du -h --apparent-size "$disk" | cut -f1); qcow2 $(du -h "$out_dir/outpost-x86_64.qcow2" | cut -f1)), kernel $kernel_version"
echo "$disk"
