# cross/ci-steps.sh — the cross-compilation, emulation and image steps of CI, as functions that
# .ci/run calls through its `step` timer. Sourced, not run. Each function is self-contained
# (installs what it needs) so the lead can order, drop or merge them freely.
# shellcheck shell=bash

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Debian packages for every step below, installed with one apt-get update.
ci_install_system_packages() {
    ensure_apt_packages musl-tools gcc-aarch64-linux-gnu libc6-dev-arm64-cross gcc-arm-linux-gnueabihf libc6-dev-armhf-cross qemu-user-static \
        binutils file ca-certificates python3 curl jq tar gzip \
        skopeo umoci systemd \
        qemu-system-x86 qemu-utils syslinux syslinux-common mtools dosfstools fdisk e2fsprogs kmod cpio
}

# rustup targets; a target whose std cannot be downloaded is reported, not fatal: cross/build,
# cross/test and cross/sizes then build armv7's std from rust-src (RUSTC_BOOTSTRAP=1
# -Z build-std with Debian's musl-dev:armhf), and skip only when that is impossible too.
ci_add_rust_targets() {
    local target
    for target in "${OUTPOST_SUPPORTED_TARGETS[@]}"; do
        ensure_rust_target "$target" ||
            log "no prebuilt std for $target: the cross steps build it from rust-src (-Z build-std) where they can"
    done
}

# Release build of the agent for every target, static check, size budget (4 MiB).
ci_cross_sizes() {
    "$OUTPOST_ROOT/cross/sizes"
}

# Runs cross/test for one target. Exit 3 (no Rust std for the target, neither from rustup nor
# built from rust-src) is reported loudly; it fails CI when OUTPOST_REQUIRE_ALL_TARGETS=1, as
# .ci/run sets it.
ci_cross_test_target() {
    local target="$1" status=0
    "$OUTPOST_ROOT/cross/test" "$target" || status=$?
    if ((status == OUTPOST_EXIT_TARGET_STD_UNAVAILABLE)); then
        if [[ "${OUTPOST_REQUIRE_ALL_TARGETS:-0}" == 1 ]]; then
            die "unit tests for $target cannot run: no Rust std for it on this machine, neither from rustup nor built from rust-src"
        fi
        log "SKIPPED: unit tests for $target: no Rust std for it on this machine, neither from rustup nor built from rust-src (the C/assembly part was checked by cross/sizes)"
        return 0
    fi
    return "$status"
}
ci_cross_test_aarch64() { ci_cross_test_target aarch64-unknown-linux-musl; }
ci_cross_test_armv7() { ci_cross_test_target armv7-unknown-linux-musleabihf; }

# The emulated aarch64 agent enrolls with an x86 control on loopback and runs a workload.
ci_cross_e2e_aarch64() {
    "$OUTPOST_ROOT/cross/e2e-aarch64"
}

# OCI layout for amd64 and arm64, validated with skopeo and umoci; built twice to show the
# digests are reproducible.
ci_images_oci() {
    local first second
    first="$(mktemp -d)"
    second="$(mktemp -d)"
    "$OUTPOST_ROOT/images/oci/build-oci" --out "$first/oci" >/dev/null
    "$OUTPOST_ROOT/images/oci/check-oci" "$first/oci"
    "$OUTPOST_ROOT/images/oci/build-oci" --out "$second/oci" >/dev/null
    if ! cmp -s "$first/oci/index.json" "$second/oci/index.json"; then
        rm -rf "$first" "$second"
        die "two OCI builds of the same binaries gave different digests"
    fi
    log "OCI layout reproducible: index.json sha256 $(sha256sum "$first/oci/index.json" | cut -c1-16)…"
    rm -rf "$first" "$second"
}

# systemd unit and install.sh, checked with systemd-analyze verify.
ci_images_systemd() {
    "$OUTPOST_ROOT/images/systemd/check-systemd"
}

# Builds the x86_64 disk image once and boots it under qemu-system-x86_64 (KVM if usable, else
# TCG) in a private network namespace: enroll, overlay ping with a host peer, a service, an
# offline reboot from the cache, self-election with control served from the image. Prints how
# long each part took.
ci_images_disk_boot() {
    "$OUTPOST_ROOT/images/disk/boot-test"
}
