# orderfleet developer entry points. The local stack (PostgreSQL + moto) is
# managed by scripts/stack.sh; see that file for ports and overrides.
#
#   make up | down | status     start / stop / show the local stack
#   eval "$(make -s env)"       export DATABASE_URL, AWS_* ... into your shell
#   make test                   run the test suite against the local stack
#   make run [ORDERS=10]        run the fleet locally and watch it (Ctrl-C stops)
#   make demo [ORDERS=100]      end-to-end demo with a report
#   make bench [BENCH_ARGS=..]  benchmark: the consumer runtime and the saga in process
#   make bench-fleet [BENCH_ARGS=..]  benchmark: orders through real worker processes
#   make lint                   rustfmt + clippy over the workspace
#   make cfn                    regenerate deploy/cloudformation/orderfleet.json
#   make clean-stack            stop the stack and delete its data

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
# `make -C dir -s env` must print nothing but the export lines.
MAKEFLAGS += --no-print-directory

STACK := scripts/stack.sh
CARGO ?= cargo
TEST_THREADS ?= 4
TEST_ARGS ?=
BENCH_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help up down env status tools build test run demo bench bench-fleet lint cfn clean-stack

help:
	@sed -n 's/^#   /  /p' $(firstword $(MAKEFILE_LIST))

up:
	@bash $(STACK) up

down:
	@bash $(STACK) down

env:
	@bash $(STACK) env

status:
	@bash $(STACK) status || true

tools:
	@bash $(STACK) tools

build:
	$(CARGO) build --release --bins

# Tests run with the stack's environment, and with .venv/bin first on PATH so
# they find the project's cfn-lint and aiosmtpd (not some global install).
test: up
	@bash $(STACK) tools
	@eval "$$(bash $(STACK) env)"; \
	export PATH="$(CURDIR)/.venv/bin:$$PATH"; \
	if $(CARGO) nextest --version >/dev/null 2>&1; then \
		set -x; $(CARGO) nextest run --workspace --no-fail-fast --test-threads $(TEST_THREADS) $(TEST_ARGS); \
	else \
		set -x; $(CARGO) test --workspace --no-fail-fast $(TEST_ARGS) -- --test-threads $(TEST_THREADS); \
	fi

run: up build
	@bash scripts/run.sh

demo: up build
	@bash scripts/demo.sh

# The benchmarks are their own package (bench/), built apart from the fleet's binaries.
bench: up
	$(CARGO) build --release -p orderfleet-bench --bins
	@bash scripts/bench.sh $(BENCH_ARGS)

# The fleet benchmark runs the fleet's own release binaries as processes.
bench-fleet: up
	$(CARGO) build --release --bins -p orderfleet -p orderfleet-bench
	@bash scripts/bench-fleet.sh $(BENCH_ARGS)

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The CloudFormation template, generated from the topology by the xtask crate.
cfn:
	$(CARGO) run -p xtask -- cfn

clean-stack:
	@bash $(STACK) clean
