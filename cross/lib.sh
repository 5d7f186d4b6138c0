# cross/lib.sh — shared helpers for cross/build, cross/test, cross/sizes and cross/e2e-aarch64.
# Sourced, never run. Knows the three supported targets, how to install what each needs on a
# Debian machine (apt packages, rustup targets), the environment variables that point cargo at
# the Debian cross linkers and the qemu-user runners, and how to check that a binary is static.
# shellcheck shell=bash

OUTPOST_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Where cargo puts its output; honours CARGO_TARGET_DIR like cargo does.
outpost_target_dir() { printf '%s' "${CARGO_TARGET_DIR:-$OUTPOST_ROOT/target}"; }
OUTPOST_SUPPORTED_TARGETS=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf)
# Exit status of a script that could not get the Rust standard library for a target
# (rustup could not download it). ci-steps.sh reports such a target as skipped, every other
# failure fails the run.
OUTPOST_EXIT_TARGET_STD_UNAVAILABLE=3

log() { printf '[cross] %s\n' "$*" >&2; }
die() { printf '[cross] error: %s\n' "$*" >&2; exit 1; }

is_supported_target() {
    local candidate="$1" known
    for known in "${OUTPOST_SUPPORTED_TARGETS[@]}"; do
        [[ "$candidate" == "$known" ]] && return 0
    done
    return 1
}

require_supported_target() {
    is_supported_target "$1" ||
        die "unknown target '$1': expected one of ${OUTPOST_SUPPORTED_TARGETS[*]}"
}

# CARGO_TARGET_<TRIPLE> prefix, e.g. CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL.
cargo_target_env_prefix() { printf 'CARGO_TARGET_%s' "$(tr 'a-z-' 'A-Z_' <<<"$1")"; }
# cc-rs spelling of the triple, e.g. aarch64_unknown_linux_musl (for CC_<triple>, AR_<triple>).
cc_triple() { tr '-' '_' <<<"$1"; }

# Debian packages the native route needs to build for a target.
target_build_packages() {
    case "$1" in
        x86_64-unknown-linux-musl) echo "musl-tools binutils file lld" ;;
        aarch64-unknown-linux-musl) echo "gcc-aarch64-linux-gnu libc6-dev-arm64-cross binutils file" ;;
        armv7-unknown-linux-musleabihf) echo "gcc-arm-linux-gnueabihf libc6-dev-armhf-cross binutils file" ;;
    esac
}

# Debian packages the native route needs to run a target's binaries on this x86_64 host.
target_run_packages() {
    case "$1" in
        x86_64-unknown-linux-musl) echo "" ;;
        *) echo "qemu-user-static" ;;
    esac
}

# The C compiler for crates that build C or assembly (ring) and the linker for the final binary.
# Rust's musl targets link their own musl libc.a and crt objects ("self-contained"), so a plain
# Debian cross gcc works as the linker driver; no musl cross toolchain is needed.
target_c_compiler() {
    case "$1" in
        x86_64-unknown-linux-musl) echo "musl-gcc" ;;
        aarch64-unknown-linux-musl) echo "aarch64-linux-gnu-gcc" ;;
        armv7-unknown-linux-musleabihf) echo "arm-linux-gnueabihf-gcc" ;;
    esac
}
target_linker() {
    case "$1" in
        x86_64-unknown-linux-musl) echo "cc" ;;
        aarch64-unknown-linux-musl) echo "aarch64-linux-gnu-gcc" ;;
        armv7-unknown-linux-musleabihf) echo "arm-linux-gnueabihf-gcc" ;;
    esac
}
target_archiver() {
    case "$1" in
        x86_64-unknown-linux-musl) echo "ar" ;;
        aarch64-unknown-linux-musl) echo "aarch64-linux-gnu-ar" ;;
        armv7-unknown-linux-musleabihf) echo "arm-linux-gnueabihf-ar" ;;
    esac
}
# The qemu-user runner, empty when the host runs the target's binaries itself.
target_runner() {
    case "$1" in
        x86_64-unknown-linux-musl) echo "" ;;
        aarch64-unknown-linux-musl) echo "qemu-aarch64-static" ;;
        armv7-unknown-linux-musleabihf) echo "qemu-arm-static" ;;
    esac
}
# Architecture names used by OCI images and Debian.
target_oci_arch() {
    case "$1" in
        x86_64-unknown-linux-musl) echo "amd64" ;;
        aarch64-unknown-linux-musl) echo "arm64" ;;
        armv7-unknown-linux-musleabihf) echo "arm" ;;
    esac
}
# What `readelf -h` prints as the machine of a correct binary for the target.
target_elf_machine() {
    case "$1" in
        x86_64-unknown-linux-musl) echo "Advanced Micro Devices X86-64" ;;
        aarch64-unknown-linux-musl) echo "AArch64" ;;
        armv7-unknown-linux-musleabihf) echo "ARM" ;;
    esac
}

# apt-get update runs at most once per process tree (OUTPOST_APT_UPDATED is exported).
ensure_apt_packages() {
    local wanted=() package
    for package in "$@"; do
        [[ -z "$package" ]] && continue
        if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
            wanted+=("$package")
        fi
    done
    ((${#wanted[@]} == 0)) && return 0
    command -v apt-get >/dev/null || die "missing packages ${wanted[*]} and no apt-get to install them"
    local sudo_prefix=()
    [[ "$(id -u)" != 0 ]] && sudo_prefix=(sudo)
    if [[ "${OUTPOST_APT_UPDATED:-}" != 1 ]]; then
        log "apt-get update"
        # A mirror index that fails to refresh (e.g. "Mirror sync in progress") is not fatal:
        # the install below fails with apt's own message if a package really is missing.
        "${sudo_prefix[@]}" apt-get update -qq || log "warning: apt-get update reported errors; installing from the indexes it has"
        export OUTPOST_APT_UPDATED=1
    fi
    log "apt-get install ${wanted[*]}"
    DEBIAN_FRONTEND=noninteractive "${sudo_prefix[@]}" apt-get install -y -qq --no-install-recommends \
        "${wanted[@]}" >/dev/null
}

# Installs the Rust standard library for the target through rustup when it is missing.
# Returns non-zero, after saying why, when rustup cannot get it (no rust-std for the target on
# the dist server this machine reaches, or no network).
ensure_rust_target() {
    local target="$1"
    if rustup target list --installed 2>/dev/null | grep -qx "$target"; then
        return 0
    fi
    log "rustup target add $target"
    local rustup_output
    if ! rustup_output="$(rustup target add "$target" 2>&1)"; then
        log "error: the Rust standard library for $target is not installed and 'rustup target add $target' could not download it: $(grep -m1 -E 'error|Caused|status code' <<<"$rustup_output" | xargs)"
        return 1
    fi
}

# --- build-std route: the target's std compiled from rust-src ----------------------------------
# Where rustup cannot download a target's prebuilt std (armv7 on our CI machine: the rust-std
# component gives 404) but the rust-src component is available, the scripts build std from
# source with cargo's unstable `-Z build-std`, unlocked on the stable toolchain by
# RUSTC_BOOTSTRAP=1. The prebuilt rust-std also carries the musl "self-contained" objects
# (libc.a, crt1.o, crti.o, crtn.o, libunwind.a); build-std does not, so they come from
# Debian's musl-dev for the target's architecture (downloaded and unpacked, not installed)
# and gcc's libgcc_eh.a stands in for libunwind.a. The linker is still the Debian cross gcc, told
# to link no self-contained objects and to take its start files and libc from that sysroot.

# Debian architecture whose musl-dev provides the target's musl, empty when not supported.
target_debian_musl_arch() {
    case "$1" in
        armv7-unknown-linux-musleabihf) echo "armhf" ;;
        *) echo "" ;;
    esac
}

# Cargo arguments of the build-std route (empty when the prebuilt std is used). Set by
# ensure_target_std; callers pass "${OUTPOST_BUILD_STD_ARGS[@]}" to cargo.
OUTPOST_BUILD_STD_ARGS=()

# Directory of the musl sysroot (libc.a, crt objects, libunwind.a) for the build-std route.
build_std_sysroot_dir() { printf '%s/build-std-sysroot/%s' "$(outpost_target_dir)" "$1"; }

# Installs rustup's rust-src component when it is missing. Returns 1 after saying why when it
# cannot.
ensure_rust_src() {
    if rustup component list --installed 2>/dev/null | grep -qx 'rust-src'; then
        return 0
    fi
    log "rustup component add rust-src"
    local rustup_output
    if ! rustup_output="$(rustup component add rust-src 2>&1)"; then
        log "error: 'rustup component add rust-src' failed: $(grep -m1 -E 'error|Caused|status code' <<<"$rustup_output" | xargs)"
        return 1
    fi
}

# Builds the musl sysroot for the build-std route once (kept under the target dir; a stamp
# file marks it complete). Downloads Debian's musl-dev:ARCH with apt-get download; when ARCH
# is not yet a dpkg foreign architecture it is added for that download and removed again, so
# the machine's later `apt-get update`s do not fetch ARCH indexes.
ensure_build_std_sysroot() {
    local target="$1" debian_arch sysroot stamp work
    debian_arch="$(target_debian_musl_arch "$target")"
    [[ -n "$debian_arch" ]] || { log "error: no Debian musl package known for $target"; return 1; }
    sysroot="$(build_std_sysroot_dir "$target")"
    stamp="$sysroot/.complete"
    [[ -f "$stamp" ]] && return 0
    command -v apt-get >/dev/null || { log "error: the build-std route for $target needs apt-get to fetch musl-dev:$debian_arch"; return 1; }
    local sudo_prefix=()
    [[ "$(id -u)" != 0 ]] && sudo_prefix=(sudo)
    local added_architecture=0
    if ! dpkg --print-foreign-architectures | grep -qx "$debian_arch"; then
        log "dpkg --add-architecture $debian_arch (for apt-get download musl-dev:$debian_arch; removed again afterwards)"
        "${sudo_prefix[@]}" dpkg --add-architecture "$debian_arch"
        added_architecture=1
    fi
    # Some mirror indexes (e.g. security for the new architecture) may fail to refresh; the
    # download below says clearly if musl-dev itself cannot be found.
    log "apt-get update (with $debian_arch)"
    "${sudo_prefix[@]}" apt-get update -qq >/dev/null 2>&1 || log "warning: apt-get update reported errors; trying the download anyway"
    work="$(mktemp -d)"
    local download_status=0
    (cd "$work" && apt-get download -qq "musl-dev:$debian_arch" >/dev/null 2>&1) || download_status=$?
    if ((added_architecture)); then
        "${sudo_prefix[@]}" dpkg --remove-architecture "$debian_arch" ||
            log "warning: could not remove dpkg architecture $debian_arch again"
    fi
    if ((download_status != 0)) || ! compgen -G "$work/musl-dev_*_$debian_arch.deb" >/dev/null; then
        rm -rf "$work"
        log "error: apt-get download musl-dev:$debian_arch failed (exit $download_status): no musl libc for the build-std route of $target"
        return 1
    fi
    dpkg-deb -x "$work"/musl-dev_*_"$debian_arch".deb "$work/root"
    local musl_lib_dir
    musl_lib_dir="$(find "$work/root/usr/lib" -name crt1.o -printf '%h\n' | head -n 1)"
    [[ -n "$musl_lib_dir" && -f "$musl_lib_dir/libc.a" ]] || {
        rm -rf "$work"
        log "error: musl-dev:$debian_arch has no crt1.o/libc.a"
        return 1
    }
    rm -rf "$sysroot"
    mkdir -p "$sysroot"
    cp "$musl_lib_dir"/*.o "$musl_lib_dir"/*.a "$sysroot/"
    # std's unwind crate links libunwind.a on musl; gcc's libgcc_eh.a has the same _Unwind_*
    # functions (ARM EHABI included) for the target.
    local gcc_eh
    gcc_eh="$("$(target_c_compiler "$target")" -print-file-name=libgcc_eh.a)"
    [[ -f "$gcc_eh" ]] || { rm -rf "$work"; log "error: $(target_c_compiler "$target") has no libgcc_eh.a"; return 1; }
    cp "$gcc_eh" "$sysroot/libunwind.a"
    dpkg-deb -f "$work"/musl-dev_*_"$debian_arch".deb Version >"$sysroot/musl-version"
    rm -rf "$work"
    touch "$stamp"
    log "musl sysroot for $target: $sysroot (Debian musl-dev:$debian_arch $(cat "$sysroot/musl-version"))"
}

# Switches the current environment to the build-std route for the target: RUSTC_BOOTSTRAP=1,
# -Z build-std in OUTPOST_BUILD_STD_ARGS, and link flags that take crt objects and libc from
# the musl sysroot instead of rustup's self-contained ones. Call after export_native_target_env.
export_build_std_env() {
    local target="$1" prefix sysroot rustflags_var
    prefix="$(cargo_target_env_prefix "$target")"
    sysroot="$(build_std_sysroot_dir "$target")"
    rustflags_var="${prefix}_RUSTFLAGS"
    # -B: gcc takes crt1.o/crti.o/crtn.o from the sysroot (crtbeginT.o/crtend.o stay gcc's);
    # -L: libc.a and libunwind.a from the sysroot ahead of the glibc cross libraries.
    export "$rustflags_var=${!rustflags_var} -C link-self-contained=no -L native=$sysroot -C link-arg=-B$sysroot/"
    export RUSTC_BOOTSTRAP=1
    OUTPOST_BUILD_STD_ARGS=(-Z build-std=std,panic_abort)
}

# Makes the target's std available: rustup's prebuilt std when it can be installed, otherwise
# (for targets with a Debian musl, i.e. armv7) std built from rust-src. Call after
# export_native_target_env. Returns 1, after saying why, when neither works.
ensure_target_std() {
    local target="$1"
    if ensure_rust_target "$target"; then
        return 0
    fi
    if [[ -z "$(target_debian_musl_arch "$target")" ]]; then
        return 1
    fi
    log "falling back to building std from source for $target: RUSTC_BOOTSTRAP=1 cargo -Z build-std=std,panic_abort (rust-src + Debian musl-dev:$(target_debian_musl_arch "$target")), because rustup cannot download the prebuilt std here"
    ensure_rust_src || return 1
    ensure_build_std_sysroot "$target" || return 1
    export_build_std_env "$target"
    log "USING build-std for $target: RUSTC_BOOTSTRAP=1, ${OUTPOST_BUILD_STD_ARGS[*]}, musl $(cat "$(build_std_sysroot_dir "$target")/musl-version") from Debian"
}

# Builds only ring's C and assembly for the target with the Debian cross compiler (its build
# script runs on the host) and checks the objects are for the target's machine. This is the part
# of a cross build that depends on Debian's gcc; used when the Rust std for the target is missing.
check_ring_c_objects() {
    local target="$1" objects machine_word
    log "checking ring's C/assembly for $target with $(target_c_compiler "$target") (cargo build -p ring --keep-going)"
    (cd "$OUTPOST_ROOT" && cargo build -p ring --target "$target" --release --keep-going >/dev/null 2>&1) || true
    objects="$(find "$(outpost_target_dir)/$target/release/build" -path '*/ring-*/out/*.o' 2>/dev/null | head -n 200)"
    [[ -n "$objects" ]] || { log "error: ring's build script produced no objects for $target"; return 1; }
    case "$target" in
        armv7-*) machine_word="ARM" ;;
        aarch64-*) machine_word="AArch64" ;;
        x86_64-*) machine_word="X86-64" ;;
    esac
    local object bad=0 count=0
    while read -r object; do
        count=$((count + 1))
        readelf -hW "$object" | grep -q "Machine:.*$machine_word" || { log "error: $object is not $machine_word"; bad=1; }
    done <<<"$objects"
    ((bad == 0)) || return 1
    log "ring: $count C/assembly objects built for $target ($machine_word)"
}

# Registers the target's qemu-user interpreter with the kernel's binfmt_misc (as Debian's
# binfmt-support would), so an emulated program can exec other programs of its architecture:
# the agent starts every workload through its own binary (`outpost-agent __launch`), which
# fails with "Exec format error" under a plain qemu-user runner. Uses Debian's
# /usr/share/binfmts/qemu-ARCH description (interpreter, magic, mask, flags). Root only; says
# what is missing and returns 1 when it cannot register.
ensure_binfmt_for_target() {
    local target="$1" name
    case "$target" in
        aarch64-*) name=qemu-aarch64 ;;
        armv7-*) name=qemu-arm ;;
        *) return 0 ;;
    esac
    local binfmt_dir=/proc/sys/fs/binfmt_misc
    if [[ ! -e "$binfmt_dir/register" ]]; then
        mount -t binfmt_misc binfmt_misc "$binfmt_dir" 2>/dev/null || {
            log "warning: cannot mount binfmt_misc at $binfmt_dir (not root?): programs the emulated $target agent execs itself will fail with Exec format error"
            return 1
        }
    fi
    [[ -e "$binfmt_dir/$name" ]] && return 0
    local description="/usr/share/binfmts/$name"
    [[ -f "$description" ]] || { log "warning: no $description (package qemu-user-static)"; return 1; }
    local interpreter magic mask offset flags=""
    interpreter="$(awk '$1 == "interpreter" { print $2 }' "$description")"
    magic="$(awk '$1 == "magic" { print $2 }' "$description")"
    mask="$(awk '$1 == "mask" { print $2 }' "$description")"
    offset="$(awk '$1 == "offset" { print $2 }' "$description")"
    grep -q '^preserve yes' "$description" && flags+="P"
    grep -q '^credentials yes' "$description" && flags+="C"
    grep -q '^fix_binary yes' "$description" && flags+="F"
    [[ -x "$interpreter" ]] || { log "warning: binfmt interpreter $interpreter is missing"; return 1; }
    if ! printf ':%s:M:%s:%s:%s:%s:%s' "$name" "$offset" "$magic" "$mask" "$interpreter" "$flags" \
        >"$binfmt_dir/register" 2>/dev/null; then
        log "warning: could not register $name with binfmt_misc"
        return 1
    fi
    log "registered $name ($interpreter, flags $flags) with binfmt_misc"
}

# Exports the environment that points cargo and cc-rs at the Debian cross tools for the target.
# Nothing is written to a config file: the root Cargo.toml and .cargo/ stay untouched.
export_native_target_env() {
    local target="$1" prefix triple runner
    prefix="$(cargo_target_env_prefix "$target")"
    triple="$(cc_triple "$target")"
    export "${prefix}_LINKER=$(target_linker "$target")"
    # relocation-model=static: a plain static executable (ELF EXEC) with no dynamic section.
    # Rust's musl targets otherwise produce static-pie, which carries a .dynamic section of
    # relative relocations. crt-static is already the musl targets' default.
    local rustflags="-C relocation-model=static -C target-feature=+crt-static"
    # x86_64, the target closest to the 4 MiB budget: lld with identical-code folding
    # (--icf=all) merges the many byte-identical monomorphised functions (redb's B-tree helpers
    # per table type, serde visitors), 57 KB off the agent. Rust makes no promise that distinct
    # functions have distinct addresses. (Debian's cross gcc does not find ld.lld with
    # -fuse-ld=lld, and the ARM agents are far under the budget, so they link with ld.)
    if [[ "$target" == x86_64-* ]]; then
        rustflags+=" -C link-arg=-fuse-ld=lld -C link-arg=-Wl,--icf=all"
    fi
    export "${prefix}_RUSTFLAGS=$rustflags"
    export "CC_${triple}=$(target_c_compiler "$target")"
    export "AR_${triple}=$(target_archiver "$target")"
    runner="$(target_runner "$target")"
    if [[ -n "$runner" ]]; then
        export "${prefix}_RUNNER=$runner"
    fi
}

# Fails unless the file is a static executable for the target: right ELF machine, no program
# interpreter (PT_INTERP) and no dynamic section.
verify_static_binary() {
    local target="$1" binary="$2" headers program_headers dynamic_section
    [[ -f "$binary" ]] || die "binary '$binary' does not exist"
    headers="$(readelf -hW "$binary")" || die "readelf could not read '$binary'"
    grep -q "Machine:[[:space:]]*$(target_elf_machine "$target")\$" <<<"$headers" ||
        die "'$binary' is not built for $target: $(grep 'Machine:' <<<"$headers" | xargs)"
    program_headers="$(readelf -lW "$binary")"
    if grep -q 'INTERP' <<<"$program_headers"; then
        die "'$binary' is dynamically linked: it has a program interpreter ($(grep -o 'interpreter: [^]]*' <<<"$program_headers"))"
    fi
    dynamic_section="$(readelf -dW "$binary")"
    if ! grep -q 'There is no dynamic section' <<<"$dynamic_section"; then
        die "'$binary' has a dynamic section: $(head -c 400 <<<"$dynamic_section" | tr '\n' ' ')"
    fi
    log "static: $binary ($(file -b "$binary" | cut -d, -f1-6))"
}

# Prints "SECONDS" since the given start (date +%s.%N).
elapsed_secs_since() { awk -v start="$1" -v now="$(date +%s.%N)" 'BEGIN { printf "%.1f", now - start }'; }
