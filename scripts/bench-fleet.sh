#!/usr/bin/env bash
# The fleet benchmark against the local stack: `orderfleet-bench-fleet` (the bench/ crate) with
# all arguments passed through (make bench-fleet BENCH_ARGS="..."). It starts the benchmark
# endpoint (SQS and EventBridge) and the worker processes itself; PostgreSQL comes from the
# stack. The lake (S3 and Firehose) goes to a moto of its own, started here, so that tests
# sharing the stack's emulator neither slow the run nor get slowed by it.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

stack_env
require_bins orderfleet orderfleet-worker orderfleet-bench-sqs orderfleet-bench-fleet
# The fleet and the database share this host, so the workers talk to PostgreSQL through its
# Unix-domain socket, as the saga benchmark does (docs/BENCHMARKS.md).
export DATABASE_URL="$ORDERFLEET_PG_SOCKET_URL"

port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
mkdir -p "$ROOT/.local"
"$ROOT/.venv/bin/python" "$ROOT/scripts/moto_server.py" -H 127.0.0.1 -p "$port" \
    >"$ROOT/.local/bench-fleet-moto.log" 2>&1 &
MOTO_PID=$!
trap 'kill "$MOTO_PID" 2>/dev/null || true; wait "$MOTO_PID" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$port/moto-api/config" 2>/dev/null && break
    kill -0 "$MOTO_PID" 2>/dev/null || die "the lake's emulator did not start (.local/bench-fleet-moto.log)"
    sleep 0.1
done
export AWS_ENDPOINT_URL="http://127.0.0.1:$port"
# The workers write each email as a file (where a deployment calls SES): about 10,000 a run. They
# go to memory when /dev/shm has a gigabyte free. On a disk what a file costs depends on the file
# system more than on the fleet: on ext4 without a journal (the benchmark machine's) the inode
# allocator skips every inode freed in the last five minutes by reading its block, so each run
# paid for the previous run's deleted emails (docs/BENCHMARKS.md, "What changed since the first
# series", item 8).
scratch=()
if [ -d /dev/shm ] && [ "$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 { print $4 }')" -ge 1048576 ] 2>/dev/null; then
    scratch=(--scratch-dir /dev/shm)
fi
"$BIN/orderfleet-bench-fleet" --bin-dir "$BIN" --lake-emulator-pid "$MOTO_PID" "${scratch[@]}" "$@"
