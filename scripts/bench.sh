#!/usr/bin/env bash
# Benchmark against the local stack: `orderfleet-bench` (the bench/ crate) with all arguments
# passed through (make bench BENCH_ARGS="...").
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

stack_env
require_bins orderfleet-bench orderfleet-bench-sqs
# The fleet and the database share this host, so the saga phase talks to PostgreSQL through its
# Unix-domain socket rather than loopback TCP (docs/BENCHMARKS.md measures the difference).
export DATABASE_URL="$ORDERFLEET_PG_SOCKET_URL"
# The runtime logs one info line per message; the benchmark measures the runtime, so it logs
# warnings only unless RUST_LOG says otherwise (docs/BENCHMARKS.md gives both figures).
export RUST_LOG="${RUST_LOG:-warn}"
exec "$BIN/orderfleet-bench" "$@"
