# shellcheck shell=bash
# Helpers shared by scripts/run.sh, scripts/demo.sh and scripts/bench.sh.
# Sourced, not executed.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT" || exit 1
# Where cargo put the release binaries: its target directory, which CARGO_TARGET_DIR or a
# cargo config may have moved away from ./target.
target_dir() {
    local meta
    if meta="$("${CARGO:-cargo}" metadata --no-deps --format-version 1 2>/dev/null)"; then
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])' <<<"$meta"
    else
        echo "$ROOT/target"
    fi
}
# ORDERFLEET_BIN_DIR points the scripts at other builds (the tests use their debug binaries).
BIN="${ORDERFLEET_BIN_DIR:-$(target_dir)/release}"
SCRIPT_NAME="$(basename "$0" .sh)"

log() { printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2; }
die() { printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2; exit 1; }

# Make sure the local stack is up (a no-op taking well under a second when it
# already is) and export its environment, so the scripts also work when run
# directly rather than through make.
stack_env() {
    bash "$ROOT/scripts/stack.sh" up
    eval "$(bash "$ROOT/scripts/stack.sh" env)"
}

require_bins() { # name...
    local b
    for b in "$@"; do
        [[ -x $BIN/$b ]] || die "$BIN/$b not found; run 'cargo build --release --bins' first (make run/demo/bench do that)"
    done
}

# ---- fleet settings --------------------------------------------------------
#
# Local runs write logs for a person: compact text, not the JSON lines CloudWatch Logs wants,
# a line per message handled, and no EMF metric lines (the worker's production default writes them to stdout, where
# CloudWatch turns them into metrics; here they would only bury the logs). Either default
# gives way to a value the caller exported.
local_output_defaults() {
    export ORDERFLEET_LOG_FORMAT="${ORDERFLEET_LOG_FORMAT:-pretty}"
    export ORDERFLEET_METRICS_SINK="${ORDERFLEET_METRICS_SINK:-none}"
    # One line per message handled, for a person following a local run. In production that
    # line is debug: it was most of the fleet's CloudWatch Logs bill (docs/BENCHMARKS.md).
    export RUST_LOG="${RUST_LOG:-info,orderfleet::runtime::consumer=debug}"
}
#
# The handlers the local fleet runs: every one by default (`--all`). Override
# with ORDERFLEET_HANDLERS=orders,inventory,... to run a subset.
SAGA_HANDLERS=all

# Sets HANDLER_ARGS, the worker flags that select its handlers, from
# ORDERFLEET_HANDLERS, then unsets that variable: the worker would also read it
# (as --handler's env), and `all` is not a handler name.
select_handlers() {
    local handlers="${ORDERFLEET_HANDLERS:-$SAGA_HANDLERS}"
    if [[ $handlers == all ]]; then
        HANDLER_ARGS=(--all)
    else
        HANDLER_ARGS=(--handler "$handlers")
    fi
    unset ORDERFLEET_HANDLERS
}

# Each payment holds a pool connection for its transaction while the sandbox
# payment provider needs another; on one shared pool, concurrent payments can
# starve it. The sandbox gets a pool of its own (same database, separate pool).
export_fleet_env() {
    export ORDERFLEET_SANDBOX_PAYMENT_DATABASE_URL="${ORDERFLEET_SANDBOX_PAYMENT_DATABASE_URL:-$DATABASE_URL}"
    select_handlers
}

# ---- worker lifecycle ------------------------------------------------------
#
# The worker runs in the background in its own process group (set -m), so a
# Ctrl-C in the terminal reaches only this script, which forwards exactly one
# SIGINT (or SIGTERM) to the worker and then waits for it to shut down
# gracefully. (Without set -m a non-interactive bash would start it with
# SIGINT ignored and the terminal would also signal it directly.)

WORKER_PID=""
STOP_REQUESTED=0
SIGNALLED=0

forward_signal() { # INT|TERM
    SIGNALLED=1
    STOP_REQUESTED=1
    if [[ -n $WORKER_PID ]] && kill -0 "$WORKER_PID" 2>/dev/null; then
        log "SIG$1 received, forwarding to worker (pid $WORKER_PID) and waiting for it to exit"
        kill -s "$1" "$WORKER_PID" 2>/dev/null || true
    fi
}

# With WORKER_LOG set, the worker's stdout and stderr are appended to that file.
start_worker() { # worker args...
    trap 'forward_signal INT' INT
    trap 'forward_signal TERM' TERM
    trap 'cleanup_worker' EXIT
    set -m
    if [[ -n ${WORKER_LOG:-} ]]; then
        mkdir -p "$(dirname "$WORKER_LOG")"
        "$BIN/orderfleet-worker" "$@" >>"$WORKER_LOG" 2>&1 &
    else
        "$BIN/orderfleet-worker" "$@" &
    fi
    WORKER_PID=$!
    set +m
    log "worker started (pid $WORKER_PID): orderfleet-worker $*${WORKER_LOG:+ (logs in $WORKER_LOG)}"
}

# Wait for the worker to exit; returns its exit status. A trapped signal
# interrupts `wait`, so keep waiting until the worker itself is done (bash
# remembers the status of exited background children, so this is exact).
wait_worker() {
    local rc
    [[ -n $WORKER_PID ]] || return 0
    while :; do
        SIGNALLED=0
        rc=0
        wait "$WORKER_PID" || rc=$?
        ((SIGNALLED)) || break
    done
    WORKER_PID=""
    return "$rc"
}

# SIGTERM the worker and wait for it; returns its exit status.
stop_worker() {
    [[ -n $WORKER_PID ]] || return 0
    if kill -0 "$WORKER_PID" 2>/dev/null; then
        log "stopping worker (pid $WORKER_PID)"
        kill -TERM "$WORKER_PID" 2>/dev/null || true
    fi
    wait_worker
}

# Other background processes of the script (run.sh's publisher and watch): the
# EXIT trap stops them too.
HELPER_PIDS=()

# EXIT trap: never leave a worker behind (e.g. when a step fails under set -e
# or publish is interrupted). Gives it 60 s to shut down (the worker's default
# --stop-timeout-secs: receives in flight return, then the grace), then kills it.
cleanup_worker() {
    local rc=$? i pid
    for pid in "${HELPER_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n $WORKER_PID ]] && kill -0 "$WORKER_PID" 2>/dev/null; then
        # Already signalled by forward_signal? Then just give it time.
        if ((!STOP_REQUESTED)); then
            log "stopping worker (pid $WORKER_PID)"
            kill -TERM "$WORKER_PID" 2>/dev/null || true
        fi
        for ((i = 0; i < 600; i++)); do
            kill -0 "$WORKER_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$WORKER_PID" 2>/dev/null; then
            log "worker did not exit within 60s, killing it"
            kill -KILL "$WORKER_PID" 2>/dev/null || true
        fi
        wait "$WORKER_PID" 2>/dev/null || true
    fi
    exit "$rc"
}

# ---- a commerce platform ---------------------------------------------------
#
# With PLATFORM=shopify or commercetools, orders arrive as that platform's
# events on its partner event bus. On AWS the platform creates the partner
# event source; here nobody would, so this creates it in the emulator (the
# platform's side of the API, CreatePartnerEventSource) and exports
# ORDERFLEET_PARTNER_SOURCES for `orderfleet provision` and `publish`.
connect_platform() {
    PUBLISH_PLATFORM_ARGS=()
    [[ -n ${PLATFORM:-} ]] || return 0
    case $PLATFORM in
    shopify | commercetools) ;;
    *) die "PLATFORM must be shopify or commercetools, not '$PLATFORM'" ;;
    esac
    local source="aws.partner/$PLATFORM.com/local/${ORDERFLEET_PREFIX:-orderfleet}"
    "$ROOT/.venv/bin/python" - "$source" <<'PY'
import os, sys, boto3
events = boto3.client("events", region_name=os.environ["AWS_REGION"],
                      endpoint_url=os.environ["AWS_ENDPOINT_URL"])
try:
    events.create_partner_event_source(Name=sys.argv[1], Account="123456789012")
except events.exceptions.ResourceAlreadyExistsException:
    pass
PY
    export ORDERFLEET_PARTNER_SOURCES="$source"
    PUBLISH_PLATFORM_ARGS=(--platform "$PLATFORM")
    log "orders arrive as $PLATFORM events on the partner bus $source"
}
