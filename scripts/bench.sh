#!/usr/bin/env bash
# Benchmark against the local stack: `orderfleet bench` with all arguments
# passed through (make bench BENCH_ARGS="...").
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

stack_env
require_bins orderfleet
exec "$BIN/orderfleet" bench "$@"
