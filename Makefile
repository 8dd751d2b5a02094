# adstream: two commands for a fresh machine.
#   make demo   install/build what is missing, start the local stack, run a short scenario
#   make test   install/build what is missing, start the services tests need, run every test, stop what it started
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo
DEMO_DIR ?= .stack/demo
DEMO_PREFIX ?=
DEMO_EVENTS ?= 300000

.PHONY: all build bootstrap stack-up stack-down stack-status topics demo test test-unit lint fmt check-schemas check-compose clean

all: build

bootstrap:
	@scripts/bootstrap.sh >/dev/null

build: bootstrap
	$(CARGO) build --release --workspace --locked

stack-up: bootstrap
	scripts/stack.sh up

stack-down:
	scripts/stack.sh down

stack-status:
	scripts/stack.sh status

topics: build
	eval "$$(scripts/stack.sh env)"; ./topics.sh 6 1

demo: build stack-up
	@eval "$$(scripts/stack.sh env)"; mkdir -p $(DEMO_DIR); \
	./topics.sh 6 1 >/dev/null; \
	echo "== producing $(DEMO_EVENTS) events (scenario: scenarios/demo.json)"; \
	./target/release/adstream-producer --events $(DEMO_EVENTS) --seed 7 \
	  --scenario scenarios/demo.json --episodes-out $(DEMO_DIR)/episodes.json \
	  --record $(DEMO_DIR)/sent.jsonl --summary-out $(DEMO_DIR)/summary.json; \
	echo "== summary ($(DEMO_DIR)/summary.json)"; cat $(DEMO_DIR)/summary.json; echo; \
	echo "== injected anomaly episodes ($(DEMO_DIR)/episodes.json)"; cat $(DEMO_DIR)/episodes.json; echo; \
	for t in ad-impressions ad-clicks ad-conversions; do \
	  echo "== first records of $$t"; ./target/release/adstream-admin peek --topic $$t --count 2; done; \
	echo "== topics"; ./target/release/adstream-admin describe; \
	echo; echo "Everything sent is recorded in $(DEMO_DIR)/sent.jsonl."; \
	echo "The stack keeps running: 'make stack-status', 'make stack-down'."

fmt:
	$(CARGO) fmt --all

lint: bootstrap
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

check-schemas:
	@if [ -x ../shared/tools/check-schemas ]; then ../shared/tools/check-schemas schemas; \
	 else echo "check-schemas: ../shared/tools/check-schemas not present, skipped"; fi

check-compose: bootstrap
	"$$(scripts/bootstrap.sh)" scripts/check_compose.py docker-compose.yml

test-unit: bootstrap
	$(CARGO) test --workspace --locked --lib --bins

# Every test: lint, contract checks, unit tests, then integration tests with the stack.
test: bootstrap
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory lint check-schemas check-compose; \
	python3 -m unittest discover -s oracle; \
	$(CARGO) build --workspace --locked --all-targets; \
	scripts/with-stack.sh $(CARGO) test --workspace --locked -- --test-threads=2; \
	echo "make test: all passed in $$(( $$(date +%s) - start )) s"

clean:
	$(CARGO) clean
