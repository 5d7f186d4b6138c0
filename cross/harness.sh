# cross/harness.sh — shared by cross/e2e-aarch64 and images/disk/boot-test: builds and starts a
# real x86 outpost-control on loopback, runs outpostctl against it, waits for conditions with a
# deadline and stops every process it started (by pid) when the script exits. Sourced, not run.
# shellcheck shell=bash

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

HARNESS_PIDS=()
HARNESS_DIR=""

# Stops every process the harness started: SIGTERM, up to 10 s, then SIGKILL. Keeps the temp
# dir when OUTPOST_KEEP_TMP=1 or when the script failed (its logs say why).
harness_cleanup() {
    local status=$? pid waited
    for pid in "${HARNESS_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || continue
    done
    for pid in "${HARNESS_PIDS[@]}"; do
        waited=0
        while kill -0 "$pid" 2>/dev/null && ((waited < 100)); do
            sleep 0.1
            waited=$((waited + 1))
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n "$HARNESS_DIR" ]]; then
        if ((status != 0)); then
            log "failed (exit $status); logs kept in $HARNESS_DIR"
            harness_dump_logs
        elif [[ "${OUTPOST_KEEP_TMP:-0}" == 1 ]]; then
            log "temp dir kept: $HARNESS_DIR"
        else
            rm -rf "$HARNESS_DIR"
        fi
    fi
    exit "$status"
}

harness_init() {
    HARNESS_DIR="$(mktemp -d "${TMPDIR:-/tmp}/outpost-$1.XXXXXX")"
    trap harness_cleanup EXIT
    trap 'exit 130' INT TERM
}

harness_track_pid() { HARNESS_PIDS+=("$1"); }

# Prints the last lines of every log in the temp dir (for failures in CI).
harness_dump_logs() {
    local file
    for file in "$HARNESS_DIR"/*.log; do
        [[ -f "$file" ]] || continue
        printf '\n----- last lines of %s -----\n' "$file" >&2
        tail -n 40 "$file" >&2
    done
}

# wait_until DEADLINE_SECS DESCRIPTION COMMAND... : polls COMMAND every 0.5 s. Exit status 0
# means done, 1 means not yet, anything else aborts the wait with that status (a check uses it
# when a process it depends on has died). Fails naming DESCRIPTION when the deadline passes.
wait_until() {
    local deadline_secs="$1" description="$2"
    shift 2
    local started now status
    started="$(date +%s)"
    while true; do
        status=0
        "$@" || status=$?
        if ((status == 0)); then
            log "$description after $(($(date +%s) - started)) s"
            return 0
        fi
        if ((status != 1)); then
            log "error: gave up waiting for: $description (check failed with status $status)"
            return "$status"
        fi
        now="$(date +%s)"
        if ((now - started >= deadline_secs)); then
            log "error: timed out after ${deadline_secs} s waiting for: $description"
            return 1
        fi
        sleep 0.5
    done
}

# alive PID NAME LOG: status 0 while the process runs, else says so and returns 2 (abort).
alive() {
    kill -0 "$1" 2>/dev/null && return 0
    log "error: $2 (pid $1) exited; see $3"
    return 2
}

# Builds the host (x86_64 gnu) control service and outpostctl; sets OUTPOST_CONTROL_BIN and
# OUTPOSTCTL_BIN. Reuses binaries named by those variables when they are already set.
harness_build_host_control() {
    if [[ -z "${OUTPOST_CONTROL_BIN:-}" || -z "${OUTPOSTCTL_BIN:-}" ]]; then
        log "cargo build -p outpost-control --bins (host)"
        (cd "$OUTPOST_ROOT" && cargo build -p outpost-control --bins >&2)
        OUTPOST_CONTROL_BIN="$(outpost_target_dir)/debug/outpost-control"
        OUTPOSTCTL_BIN="$(outpost_target_dir)/debug/outpostctl"
    fi
    [[ -x "$OUTPOST_CONTROL_BIN" ]] || die "no control binary at $OUTPOST_CONTROL_BIN"
    [[ -x "$OUTPOSTCTL_BIN" ]] || die "no outpostctl binary at $OUTPOSTCTL_BIN"
    "$OUTPOST_CONTROL_BIN" --version >/dev/null 2>&1 || die "$OUTPOST_CONTROL_BIN --version failed"
}

# harness_start_control LISTEN [SERVE ARGS...]: starts `outpost-control serve` with a fresh
# data dir, waits for control.url and admin/outpostctl.json; sets HARNESS_CONTROL_URL and
# HARNESS_CTL_CONFIG.
harness_start_control() {
    local listen="$1"
    shift
    local data_dir="$HARNESS_DIR/control"
    mkdir -p "$data_dir"
    env -u OUTPOST_CONFIG -u OUTPOST_TOKEN -u OUTPOST_CONTROL_URL -u DATABASE_URL \
        "$OUTPOST_CONTROL_BIN" serve --data-dir "$data_dir" --listen "$listen" "$@" \
        >"$HARNESS_DIR/control.log" 2>&1 &
    local pid=$!
    harness_track_pid "$pid"
    control_ready() {
        alive "$pid" outpost-control "$HARNESS_DIR/control.log" || return
        [[ -s "$data_dir/control.url" && -s "$data_dir/admin/outpostctl.json" ]] || return 1
    }
    control_answers() { ctl nodes >/dev/null 2>&1 || return 1; }
    wait_until 60 "control wrote control.url and admin/outpostctl.json" control_ready
    HARNESS_CONTROL_URL="$(tr -d '\n' <"$data_dir/control.url")"
    HARNESS_CTL_CONFIG="$data_dir/admin/outpostctl.json"
    wait_until 30 "control answers outpostctl at $HARNESS_CONTROL_URL" control_answers
    log "control pid $pid at $HARNESS_CONTROL_URL"
}

# outpostctl against the harness control (admin token); never leaks OUTPOST_* into agents.
ctl() {
    OUTPOST_CONFIG="$HARNESS_CTL_CONFIG" "$OUTPOSTCTL_BIN" "$@"
}

# Prints a fresh enrollment token (10 minutes).
harness_create_token() {
    ctl --json enroll create --ttl 10m | python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])'
}

# Prints the port of a free loopback TCP port (bound then released; used when the port must be
# known before the server starts, e.g. for --public-url).
free_loopback_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# json_has_running DOCUMENT_FILE SERVICE: true when the JSON document (agent status or
# `outpostctl --json allocations`) holds an allocation object with "service": SERVICE and
# "state": "running"; the agent status keeps its allocations under "allocations".
json_has_running() {
    python3 - "$1" "$2" <<'PY'
import json, sys
document, service = json.load(open(sys.argv[1])), sys.argv[2]
allocations = document.get("allocations", []) if isinstance(document, dict) else document
sys.exit(0 if any(isinstance(a, dict) and a.get("service") == service and a.get("state") == "running" for a in allocations) else 1)
PY
}
