#!/bin/sh
# images/systemd/install.sh — installs outpost-agent as a systemd service on a box that runs a
# general-purpose distribution (Debian, Ubuntu, Fedora, Raspberry Pi OS, ...).
#
#   install.sh --binary PATH [--control-binary PATH]
#              [--enroll-token TOKEN | --enroll-token-file FILE] [--control URL]
#              [--root DIR] [--no-start]
#
# Copies the static agent to /usr/local/bin/outpost-agent and the unit to
# /etc/systemd/system/outpost-agent.service, writes /etc/outpost/agent.env (mode 0600) when it
# does not exist yet, then enables and starts the service. With --control-binary (or an
# outpost-control beside this script) it also installs the static control the agent runs when
# the box leads its site (D6), as /usr/local/bin/outpost-control, and names it in agent.env
# (OUTPOST_CONTROL_PROGRAM), so that an agent running from a self-updated slot still finds it.
# An existing agent.env is kept: only settings given on this command line are replaced in it.
# With --root DIR it only lays the files out under DIR (for building images); --no-start skips
# systemctl.
# POSIX sh: works on boxes without bash.
set -eu

script_dir=$(cd "$(dirname "$0")" && pwd)
binary=""
control_binary=""
token=""
control_url=""
root=""
start="yes"

fail() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }
say() { printf 'install.sh: %s\n' "$*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --binary) [ $# -ge 2 ] || fail "--binary needs a path"; binary="$2"; shift 2 ;;
        --control-binary)
            [ $# -ge 2 ] || fail "--control-binary needs a path"; control_binary="$2"; shift 2 ;;
        --enroll-token) [ $# -ge 2 ] || fail "--enroll-token needs a value"; token="$2"; shift 2 ;;
        --enroll-token-file)
            [ $# -ge 2 ] || fail "--enroll-token-file needs a path"
            [ -r "$2" ] || fail "enrollment token file '$2' is not readable"
            token=$(tr -d ' \t\r\n' <"$2"); shift 2 ;;
        --control) [ $# -ge 2 ] || fail "--control needs a URL"; control_url="$2"; shift 2 ;;
        --root) [ $# -ge 2 ] || fail "--root needs a directory"; root="$2"; start="no"; shift 2 ;;
        --no-start) start="no"; shift ;;
        -h|--help) sed -n '2,18p' "$0" >&2; exit 0 ;;
        *) fail "unknown argument '$1' (see --help)" ;;
    esac
done

if [ -z "$binary" ] && [ -f "$script_dir/outpost-agent" ]; then
    binary="$script_dir/outpost-agent"
fi
[ -n "$binary" ] || fail "--binary PATH is required (the static outpost-agent for this box)"
[ -f "$binary" ] || fail "agent binary '$binary' does not exist"
if [ -z "$control_binary" ] && [ -f "$script_dir/outpost-control" ]; then
    control_binary="$script_dir/outpost-control"
fi
[ -z "$control_binary" ] || [ -f "$control_binary" ] ||
    fail "control binary '$control_binary' does not exist"
case "$token" in
    ""|opt1.*) ;;
    *) fail "enrollment token must start with 'opt1.', got '$(printf '%s' "$token" | cut -c1-8)…'" ;;
esac
case "$control_url" in
    ""|https://*) ;;
    *) fail "control URL must start with https://, got '$control_url'" ;;
esac
if [ -z "$root" ] && [ "$(id -u)" != 0 ]; then
    fail "run as root (or pass --root DIR to lay the files out elsewhere)"
fi

# A binary for another architecture would fail at every boot; catch it now.
if [ -z "$root" ]; then
    "$binary" --version >/dev/null 2>&1 ||
        fail "'$binary' does not run on this machine ($(uname -m)); build it for this board with cross/build"
    if [ -n "$control_binary" ]; then
        "$control_binary" --version >/dev/null 2>&1 ||
            fail "'$control_binary' does not run on this machine ($(uname -m)); build it with cross/build --bin outpost-control"
    fi
fi

install -d -m 0755 "$root/usr/local/bin" "$root/etc/systemd/system"
install -d -m 0700 "$root/etc/outpost" "$root/var/lib/outpost"
install -m 0755 "$binary" "$root/usr/local/bin/outpost-agent.new"
mv -f "$root/usr/local/bin/outpost-agent.new" "$root/usr/local/bin/outpost-agent"
install -m 0644 "$script_dir/outpost-agent.service" "$root/etc/systemd/system/outpost-agent.service"
if [ -n "$control_binary" ]; then
    install -m 0755 "$control_binary" "$root/usr/local/bin/outpost-control.new"
    mv -f "$root/usr/local/bin/outpost-control.new" "$root/usr/local/bin/outpost-control"
fi
# The unit starts the stable link; the agent moves it to a self-updated slot once that binary is
# healthy. Installing (again) points it at the binary installed here.
install -d -m 0700 "$root/var/lib/outpost/agent"
ln -sfn /usr/local/bin/outpost-agent "$root/var/lib/outpost/agent/current.new"
mv -Tf "$root/var/lib/outpost/agent/current.new" "$root/var/lib/outpost/agent/current"

env_file="$root/etc/outpost/agent.env"
if [ ! -f "$env_file" ]; then
    umask 077
    {
        echo "# outpost-agent settings, read by outpost-agent.service (KEY=VALUE, no quotes needed)"
        echo "# OUTPOST_CONTROL_URL=https://control.example:7443"
        echo "# OUTPOST_ENROLL_TOKEN=opt1...."
        echo "# OUTPOST_STATUS_LISTEN=127.0.0.1:7450"
    } >"$env_file"
fi
set_setting() {
    # Replaces KEY=... in agent.env, or appends it; other lines stay as they are.
    tmp="$env_file.tmp"
    grep -v "^$1=" "$env_file" >"$tmp" || true
    printf '%s=%s\n' "$1" "$2" >>"$tmp"
    chmod 0600 "$tmp"
    mv -f "$tmp" "$env_file"
}
[ -n "$token" ] && set_setting OUTPOST_ENROLL_TOKEN "$token"
[ -n "$control_url" ] && set_setting OUTPOST_CONTROL_URL "$control_url"
[ -n "$control_binary" ] && set_setting OUTPOST_CONTROL_PROGRAM /usr/local/bin/outpost-control
chmod 0600 "$env_file"
say "installed $root/usr/local/bin/outpost-agent, $root/etc/systemd/system/outpost-agent.service, $env_file"
if [ -n "$control_binary" ]; then
    say "installed $root/usr/local/bin/outpost-control: this box can lead its site (D6)"
else
    say "no outpost-control installed: this box cannot lead its site (pass --control-binary to let it)"
fi

if [ "$start" = yes ]; then
    command -v systemctl >/dev/null || fail "systemctl not found: is this a systemd box? (use --no-start to only install files)"
    systemctl daemon-reload
    systemctl enable outpost-agent.service
    systemctl restart outpost-agent.service
    say "outpost-agent.service enabled and started; see: systemctl status outpost-agent, outpost-agent status --data-dir /var/lib/outpost"
fi
