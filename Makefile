# Sluice: the everyday commands. See README.md.
CARGO ?= cargo
SLUICE = $(CARGO) run --release --quiet --bin sluice --

.PHONY: run dev test check bench bench-guard bench-bullmq services build test-deps

## Run the API, one worker and the provider simulator against this machine's services
## with ./sluice.toml, in the foreground until Ctrl-C.
run: services build
	@trap 'kill $$(jobs -p) 2>/dev/null; wait' INT TERM; \
	$(SLUICE) sim & \
	$(SLUICE) worker & \
	$(SLUICE) serve & \
	wait

## The whole system in one process on ./sluice-data/sluice.db: no service needed.
dev: build
	$(SLUICE) dev

build:
	$(CARGO) build --release --bin sluice

## The whole test suite against the real services.
test: services test-deps
	$(CARGO) test --workspace --doc --quiet
	$(CARGO) nextest run --workspace --no-fail-fast

## Formatting and lints, as CI runs them.
check:
	$(CARGO) fmt --all -- --check
	scripts/check-rust-version.sh
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## End-to-end throughput on this machine (not a test): every lane backend with admission on
## and off, beside the durable floor (PostgreSQL + RabbitMQ, no Sluice) measured in the same run.
bench: services
	$(CARGO) build --release --bin sluice
	$(CARGO) run --release -p sluice-bench -- --config /dev/null throughput

## CI's guard: a short run that fails below a share of the durable floor (docs/PERFORMANCE.md).
bench-guard: services
	@scripts/bench-guard.sh

## BullMQ on the same Redis, the baseline `make bench` is compared with (not a test); options
## with ARGS, e.g. make bench-bullmq ARGS="--jobs 5000".
bench-bullmq: services
	scripts/bench-bullmq.sh $(ARGS)

services:
	@scripts/services.sh

## What the tests need beyond Rust: the Python venv, headless Chromium, promtool.
test-deps:
	@scripts/test-deps.sh
