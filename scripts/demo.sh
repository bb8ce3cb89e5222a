#!/usr/bin/env bash
# End-to-end demo against the local stack: provision, migrate, start the
# workers, publish ORDERS (default 100) orders, wait until they are processed
# (DEMO_TIMEOUT seconds, default 900: the emulator's PutEvents, about 12 ms per rule target, bounds the pace), print the report, stop the workers.
# Exits with the report's exit status (or the wait's, if only that failed).
#
# The worker runs every handler (orders, inventory, payments, fulfillment, ...;
# see select_handlers in lib.sh, ORDERFLEET_HANDLERS overrides) and logs to
# WORKER_LOG (default .local/demo-worker.log, emptied first; compact text and no
# EMF metric lines, see local_output_defaults in lib.sh), so that the terminal
# shows the publisher's summary, the wait's progress and the report.
#
# PLATFORM=shopify (or commercetools) makes the orders arrive as that platform's
# events on its partner event bus, through the storefront handler (see
# connect_platform in lib.sh).
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

local_output_defaults
stack_env
require_bins orderfleet orderfleet-worker

connect_platform
"$BIN/orderfleet" provision
"$BIN/orderfleet" migrate
export_fleet_env
export WORKER_LOG="${WORKER_LOG:-$ROOT/.local/demo-worker.log}"
mkdir -p "$(dirname "$WORKER_LOG")"
: >"$WORKER_LOG"
start_worker "${HANDLER_ARGS[@]}"
"$BIN/orderfleet" publish --orders "${ORDERS:-100}" "${PUBLISH_PLATFORM_ARGS[@]}"

wait_rc=0
"$BIN/orderfleet" wait --timeout-secs "${DEMO_TIMEOUT:-900}" || wait_rc=$?
((STOP_REQUESTED)) && { stop_worker || true; exit 130; }
((wait_rc == 0)) || log "'orderfleet wait' failed with status $wait_rc; reporting anyway"

report_rc=0
"$BIN/orderfleet" report || report_rc=$?

worker_rc=0
stop_worker || worker_rc=$?
((worker_rc == 0)) || log "worker exited with status $worker_rc"

if ((report_rc != 0)); then
    exit "$report_rc"
fi
exit "$wait_rc"
