# Run `make help` for the list of targets.
SHELL := /bin/bash
CARGO ?= cargo

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: deps
deps: ## Install what a fresh machine lacks (protoc, kcat, Chromium, playwright-core, axe-core; checks Java, Maven, cargo)
	@deploy/local/deps.sh

.PHONY: stack-up
stack-up: deps ## Start Kafka (KRaft, 127.0.0.1:9092) and PostgreSQL (127.0.0.1:5432); idempotent
	@deploy/local/stack.sh up

.PHONY: stack-down
stack-down: ## Stop Kafka and PostgreSQL
	@deploy/local/stack.sh down

.PHONY: build
build: deps ## Build every binary (debug)
	$(CARGO) build --workspace --bins

.PHONY: up
up: build ## Start llm-sim and the stages in the background on a running stack
	@deploy/local/services.sh up

.PHONY: down
down: ## Stop llm-sim and the stages (graceful drain)
	@deploy/local/services.sh down

.PHONY: demo
demo: stack-up build ## From a fresh clone: stack, stages, ~1,000 sample tickets, a summary, the console's address
	@token_file=$${ENRICH_STACK_DIR:-.stack}/console-admin-token; mkdir -p "$$(dirname "$$token_file")"; \
	  [ -s "$$token_file" ] || (umask 077; od -An -tx1 -N16 /dev/urandom | tr -d ' \n' >"$$token_file"); \
	  export ENRICH_DLQ_REPLAYER__ADMIN_TOKEN="$$(cat "$$token_file")"; \
	  deploy/local/services.sh up || exit $$?; \
	  echo "[demo] console: http://127.0.0.1:9104/ui (log in with the admin token in $$token_file)"; \
	  status=0; ./target/debug/loadgen demo --config config/pipeline.toml || status=$$?; \
	  echo "[demo] console: http://127.0.0.1:9104/ui (log in with the admin token in $$token_file)"; \
	  if [ -t 0 ]; then read -r -p "[demo] the stages keep running for the console; press Enter to stop them " _; fi; \
	  deploy/local/services.sh down; exit $$status

.PHONY: test
test: stack-up ## Run every test (unit and end to end against the real stack)
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace

.PHONY: bench
bench: stack-up ## Benchmark the topology with llm-sim (release build); results in bench-results/
	$(CARGO) build --release --workspace --bins
	./target/release/loadgen bench --config config/pipeline.toml --bin-dir target/release --out bench-results $(BENCH_ARGS)
	@deploy/bench/plot.sh bench-results

.PHONY: test-real-llm
test-real-llm: stack-up build ## The pipeline on 20 tickets against a real local model (SmolLM2-135M via llama.cpp; not part of make test)
	@deploy/local/real-llm.sh

.PHONY: chaos
chaos: stack-up ## Kill stages, the broker and the database under load and check every record (CHAOS_ARGS=--short for the CI form)
	$(CARGO) build --workspace --bins
	./target/debug/loadgen chaos --config config/pipeline.toml --bin-dir target/debug --out chaos-results $(CHAOS_ARGS)

.PHONY: fmt
fmt: ## Format the code
	$(CARGO) fmt --all

.PHONY: lint
lint: deps ## rustfmt check and clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

.PHONY: clean
clean: down stack-down ## Stop everything and remove build output and local stack data
	$(CARGO) clean
	rm -rf .stack
