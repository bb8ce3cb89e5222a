#!/usr/bin/env bash
# The fleet benchmark against the local stack: `orderfleet-bench-fleet` (the bench/ crate) with
# all arguments passed through (make bench-fleet BENCH_ARGS="..."). It starts the benchmark
# endpoint and the worker processes itself; PostgreSQL and the emulator (for the lake) come
# from the stack.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

stack_env
require_bins orderfleet orderfleet-worker orderfleet-bench-sqs orderfleet-bench-fleet
# The fleet and the database share this host, so the workers talk to PostgreSQL through its
# Unix-domain socket, as the saga benchmark does (docs/BENCHMARKS.md).
export DATABASE_URL="$ORDERFLEET_PG_SOCKET_URL"
exec "$BIN/orderfleet-bench-fleet" --bin-dir "$BIN" "$@"
