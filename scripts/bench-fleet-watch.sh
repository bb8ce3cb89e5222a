#!/usr/bin/env bash
# Watches a fleet benchmark run from another terminal, once a second: each queue's visible and
# in-flight messages (the endpoint's OrderfleetBench.Stats) and the outbox's unpublished rows
# per source in the run's scratch database. A queue or an outbox that keeps growing is the
# stage that holds the fleet back (docs/BENCHMARKS.md, "What changed since the first series").
#   bash scripts/bench-fleet-watch.sh http://127.0.0.1:PORT   # the URL `fleet: endpoint at` prints
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

stack_env
endpoint="${1:?usage: bench-fleet-watch.sh ENDPOINT_URL (printed by the run as \"fleet: endpoint at\")}"
admin="${DATABASE_URL%/*}/postgres"
while true; do
    queues="$(curl -fsS -X POST -H 'X-Amz-Target: OrderfleetBench.Stats' \
        -H 'Content-Type: application/x-amz-json-1.0' -d '{}' "$endpoint" |
        python3 -c '
import json, sys
queues = json.load(sys.stdin)["queues"]
print(" ".join("%s=%d/%d" % (name.rsplit("-", 1)[-1], q["visible"], q["in_flight"])
               for name, q in sorted(queues.items()) if not name.endswith("dlq")))
')" || { echo "the endpoint does not answer; the run is over"; exit 0; }
    db="$(psql "$admin" -Atc "SELECT datname FROM pg_database WHERE datname LIKE 'orderfleet_fleet_%' ORDER BY oid DESC LIMIT 1")"
    outbox=""
    if [ -n "$db" ]; then
        outbox="$(psql "${DATABASE_URL%/*}/$db" -Atc \
            "SELECT string_agg(source || '=' || n, ' ') FROM (SELECT source, count(*) n FROM outbox WHERE published_at IS NULL GROUP BY source) s" 2>/dev/null || true)"
    fi
    echo "$(date +%T) visible/in flight: $queues | unpublished: ${outbox:-none}"
    sleep 1
done
