#!/usr/bin/env bash
# Run the worker fleet locally against the local stack (PostgreSQL + moto) and
# watch it: provision queues/buses, migrate the database, start the workers,
# publish ORDERS (default 10) sample orders, and show `orderfleet watch`: a
# summary redrawn every WATCH_INTERVAL seconds (default 2) with the orders by
# outcome, messages per second per handler, queue and DLQ depths, the outbox,
# and the emails with where they are. Normally started via `make run` (which
# builds first).
#
# The terminal shows the summary only. The setup's output, the publisher's and
# the workers' logs (compact text, and no EMF metric lines unless
# ORDERFLEET_METRICS_SINK asks for them; see local_output_defaults in lib.sh)
# go to RUN_LOG, by default .local/run-<UTC time>.log, which the summary names.
#
# Ctrl-C stops everything: the publisher and the watch at once, the worker
# gracefully (SIGINT is forwarded to it; it finishes what it holds). The worker
# runs every handler (see select_handlers in lib.sh; ORDERFLEET_HANDLERS
# overrides). If the worker, the watch or the publisher fails, the script
# stops the rest and shows the end of the log.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

local_output_defaults
# On Ctrl-C the worker first lets its long polls in flight return: 5 s here
# rather than the production default of 20, so stopping is quick.
export ORDERFLEET_WAIT_TIME_SECS="${ORDERFLEET_WAIT_TIME_SECS:-5}"
stack_env
require_bins orderfleet orderfleet-worker

RUN_LOG="${RUN_LOG:-$ROOT/.local/run-$(date -u +%Y%m%d-%H%M%S).log}"
mkdir -p "$(dirname "$RUN_LOG")"
: >>"$RUN_LOG"
# The run's own id, given to both the publisher and the watch, so that the
# watch shows this run's orders from the start (not the previous run's while
# the publisher seeds the catalogue).
RUN_ID="${ORDERFLEET_RUN_ID:-run_$(date -u +%Y%m%d%H%M%S)_$RANDOM}"
log "run $RUN_ID; the workers' logs go to $RUN_LOG"

# Runs one setup step with its output in the log; on failure, shows that output.
step() { # what command...
    local what=$1 from
    shift
    printf '\n== %s: %s\n' "$what" "$*" >>"$RUN_LOG"
    from=$(($(wc -c <"$RUN_LOG") + 1))
    if ! "$@" >>"$RUN_LOG" 2>&1; then
        tail -c "+$from" "$RUN_LOG" | tail -n 40 >&2
        die "$what failed (its output is above; the whole log is $RUN_LOG)"
    fi
}

connect_platform
step provision "$BIN/orderfleet" provision
step migrate "$BIN/orderfleet" migrate
export_fleet_env
printf '\n== worker: orderfleet-worker %s\n' "${HANDLER_ARGS[*]}" >>"$RUN_LOG"
WORKER_LOG="$RUN_LOG" start_worker "${HANDLER_ARGS[@]}"

printf '\n== publish: %s orders, run %s\n' "${ORDERS:-10}" "$RUN_ID" >>"$RUN_LOG"
"$BIN/orderfleet" publish --orders "${ORDERS:-10}" --run-id "$RUN_ID" "${PUBLISH_PLATFORM_ARGS[@]}" >>"$RUN_LOG" 2>&1 &
PUBLISH_PID=$!
HELPER_PIDS+=("$PUBLISH_PID")
"$BIN/orderfleet" watch --run-id "$RUN_ID" --worker-log "$RUN_LOG" \
    --interval-secs "${WATCH_INTERVAL:-2}" &
WATCH_PID=$!
HELPER_PIDS+=("$WATCH_PID")

# Wait until Ctrl-C, or until one of the three ends. A trapped signal makes
# `wait` return early (status > 128) with STOP_REQUESTED set.
failed=""
while ((!STOP_REQUESTED)); do
    done_pid=""
    rc=0
    wait -n -p done_pid "$WORKER_PID" "$WATCH_PID" ${PUBLISH_PID:+"$PUBLISH_PID"} || rc=$?
    ((STOP_REQUESTED)) && break
    case "$done_pid" in
        "$PUBLISH_PID")
            PUBLISH_PID=""
            if ((rc != 0)); then
                failed="the publisher failed (status $rc)"
                break
            fi
            ;;
        "$WORKER_PID")
            WORKER_PID=""
            failed="the worker exited (status $rc)"
            break
            ;;
        "$WATCH_PID")
            WATCH_PID=""
            failed="the watch exited (status $rc)"
            break
            ;;
        *) ;; # an unrelated child, or a signal without a stop
    esac
done

# The watch and the publisher stop at once; the worker drains.
for pid in ${WATCH_PID:+"$WATCH_PID"} ${PUBLISH_PID:+"$PUBLISH_PID"}; do
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
done
HELPER_PIDS=()
echo
if [[ -n $failed ]]; then
    log "$failed; the end of the log:"
    tail -n 30 "$RUN_LOG" >&2
fi
rc=0
if [[ -n $WORKER_PID ]]; then
    log "stopping the worker (pid $WORKER_PID): it finishes the messages it holds"
    ((STOP_REQUESTED)) || kill -TERM "$WORKER_PID" 2>/dev/null || true
    wait_worker || rc=$?
    log "worker exited with status $rc"
fi
log "the workers' logs: $RUN_LOG"
log "emails: ${ORDERFLEET_EMAIL_OUTBOX_DIR:-$ROOT/.local/outbox}; invariants: $BIN/orderfleet report"
[[ -z $failed ]] || exit 1
exit "$rc"
