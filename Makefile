# nun-db — `make run` starts a dev node, `make test` installs test deps and runs every test.

NUN_USER ?= admin
NUN_PWD ?= admin
NUN_DBS_DIR ?= ./data
SUDO := $(shell [ "$$(id -u)" = "0" ] || echo sudo)

.PHONY: run build release test deps lint test-rust test-sh test-js test-bench bench soak clean

build:
	cargo build

release:
	cargo build --release

## Start one node on the default ports (WS 3012, HTTP 3013, TCP 3014) with a local data dir.
run: release
	@echo "nun-db dev node: admin user '$(NUN_USER)' password '$(NUN_PWD)' (override with NUN_USER/NUN_PWD), data in $(NUN_DBS_DIR)"
	@echo "try: telnet localhost 3014   then   auth $(NUN_USER) $(NUN_PWD)"
	NUN_USER='$(NUN_USER)' NUN_PWD='$(NUN_PWD)' NUN_DBS_DIR='$(NUN_DBS_DIR)' ./target/release/nun-db start

## Install what the tests need: netcat (tests-sh), promtool (metrics test), Chromium (console
## browser test), moto's S3 server (S3 tests), iproute2 (network-namespace partition tests, run
## as root), the npm driver and playwright-core (tests-js; it drives Debian's Chromium and
## downloads no browser).
deps:
	@missing=""; \
	command -v nc >/dev/null 2>&1 || missing="$$missing netcat-openbsd"; \
	command -v node >/dev/null 2>&1 || missing="$$missing nodejs npm"; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v ip >/dev/null 2>&1 || missing="$$missing iproute2"; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; fi
	python3 -c "import moto.server" 2>/dev/null || python3 -m pip install -q 'moto[server]'
	cd tests-js && npm ci --no-audit --no-fund

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

test-rust:
	cargo test --all-targets
	# Memory per session is a figure of the build operators run.
	cargo test --release --test connections

test-sh: build
	NUN_DB_BIN=$(CURDIR)/target/debug/nun-db bash tests-sh/run-all.sh

test-js: build
	cd tests-js && NUN_DB_BIN=$(CURDIR)/target/debug/nun-db npm test

## The fault tests (namespace partitions and chaos) over and over; stops at the first failure.
SOAK_RUNS ?= 10
soak: deps
	for i in $$(seq 1 $(SOAK_RUNS)); do echo "soak run $$i of $(SOAK_RUNS)"; \
		cargo test --test partition --test chaos || exit 1; done

## Everything CI runs.
test: deps lint test-rust test-sh test-js

clean:
	cargo clean

## Benchmarks against Redis on loopback; rewrites BENCHMARKS.md.
bench:
	bash scripts/bench.sh
