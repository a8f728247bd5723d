# `make test` and `make demo` work on a fresh machine: they build .venv on first use.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU machines get the local CPU build of torch before anything else: a plain `torch`
# requirement would otherwise pull a multi-GB CUDA build. torchvision is pinned to the
# release built for that torch (a newer one would pull a newer torch); its compiled
# operators need CUDA torch, and workloads/piip/vision_ops.py covers for them.
TORCH_CPU := torch==2.13.0 torchvision==0.28.0

.PHONY: test chromium lint faults demo experiment piip-experiment down ring-demo install bench gpu-bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(VPY) -m pip install -q $(TORCH_CPU); fi
	$(VPY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# The UI test renders MLflow's pages in headless Chromium (Debian's package).
test: $(STAMP) chromium
	$(VPY) -m pytest -q -m "not gpu" --durations=30 tests

chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# ruff, configured in pyproject.toml (CI runs it before the tests)
lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The fault-injection suite alone (it also runs within `make test`), then its table.
faults: $(STAMP)
	mkdir -p out
	LONGVIEW_FAULT_REPORT=$(CURDIR)/out/faults.json $(VPY) -m pytest -q tests/e2e/test_faults.py tests/e2e/test_outages.py tests/e2e/test_elastic.py tests/e2e/test_security_scan.py
	$(VPY) -m tests.e2e.report out/faults.json

# The services it starts stay up for browsing the run: `make down` stops them.
demo: $(STAMP)
	$(VPY) -m orchestrator.demo

# V2PE against plain positions, trained and evaluated (about 16 minutes on 2 cores);
# writes length-generalisation.{png,md} to $(OUT)/experiment (OUT=docs renews the README's).
OUT ?= out
experiment: $(STAMP)
	$(VPY) -m orchestrator.demo experiment $(if $(filter docs,$(OUT)),docs,$(OUT)/experiment)

# PIIP-tiny against a single-branch ViT, Mask R-CNN on generated shapes; writes
# piip-detection.{png,md} to $(OUT)/piip-experiment (OUT=docs renews the README's).
piip-experiment: $(STAMP)
	$(VPY) -m orchestrator.demo piip-experiment $(if $(filter docs,$(OUT)),docs,$(OUT)/piip-experiment)

down: $(STAMP)
	$(VPY) -m orchestrator.cli down

ring-demo: $(STAMP)
	$(VPY) -m parallelism.ring_demo

bench: $(STAMP)
	$(VPY) benchmarks/ring_cpu.py

# Every GPU figure in one run (at most 8 minutes on one H100/H200, never yet run on one; `make test` runs its --smoke
# mode on CPU). On a GPU machine without the venv: python benchmarks/gpu_all.py --out gpu_all.json
gpu-bench: $(STAMP)
	$(VPY) benchmarks/gpu_all.py --out gpu_all.json

clean:
	rm -rf $(VENV) build *.egg-info
