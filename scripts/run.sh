#!/usr/bin/env bash
# Run the worker fleet locally against the local stack (PostgreSQL + moto):
# provision queues/buses, migrate the database, start the workers, publish
# ORDERS (default 10) sample orders, then keep the workers running until
# Ctrl-C (SIGINT/SIGTERM are forwarded to the worker, which shuts down
# gracefully). Normally started via `make run` (which builds first).
#
# The worker runs the saga handlers (orders, inventory, payments, fulfillment;
# see select_handlers in lib.sh, ORDERFLEET_HANDLERS overrides) and logs to the
# terminal. Once the orders are terminal the report is printed, and the fleet
# keeps running for more `orderfleet publish` runs.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

export ORDERFLEET_LOG_FORMAT="${ORDERFLEET_LOG_FORMAT:-pretty}"
stack_env
require_bins orderfleet orderfleet-worker

"$BIN/orderfleet" provision
"$BIN/orderfleet" migrate
export_fleet_env
start_worker "${HANDLER_ARGS[@]}"
"$BIN/orderfleet" publish --orders "${ORDERS:-10}"
if ((!STOP_REQUESTED)) && "$BIN/orderfleet" wait --timeout-secs "${RUN_TIMEOUT:-900}"; then
    "$BIN/orderfleet" report || log "the report found broken invariants (see above)"
fi
((STOP_REQUESTED)) || log "workers running; press Ctrl-C to stop"

rc=0
wait_worker || rc=$?
log "worker exited with status $rc"
exit "$rc"
