#!/usr/bin/env bash
# Run the worker fleet locally against the local stack (PostgreSQL + moto):
# provision queues/buses, migrate the database, start all workers, publish
# ORDERS (default 10) sample orders, then keep the workers running until
# Ctrl-C (SIGINT/SIGTERM are forwarded to the worker, which shuts down
# gracefully). Normally started via `make run` (which builds first).
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

export ORDERFLEET_LOG_FORMAT="${ORDERFLEET_LOG_FORMAT:-pretty}"
stack_env
require_bins orderfleet orderfleet-worker

"$BIN/orderfleet" provision
"$BIN/orderfleet" migrate
start_worker --all
"$BIN/orderfleet" publish --orders "${ORDERS:-10}"
((STOP_REQUESTED)) || log "workers running; press Ctrl-C to stop"

rc=0
wait_worker || rc=$?
log "worker exited with status $rc"
exit "$rc"
