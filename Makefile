# calcnode — the two commands a newcomer needs: `make demo` and `make test`.
#
# Both create .venv when missing and install what they need: torch (the local CPU
# build torch==2.13.0 when no torch is importable; a CUDA torch already in the venv
# is kept), the project with its dev extras, and — when running as root — the Debian
# packages the tests use (dcmtk, dicom3tools, orthanc, orthanc-dicomweb, libpixelmed-java,
# chromium, postgresql, dicomscope and a JDK). `make test` also unpacks the pinned OHIF
# viewer into .cache/ (`make ohif`). The three set-up steps run side by side (apt, pip and
# npm wait on different things), then the suite.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIN ?= torch==2.13.0
DEBIAN_PACKAGES := dcmtk dicom3tools orthanc orthanc-dicomweb libpixelmed-java chromium postgresql \
	dicomscope default-jdk-headless
# The OHIF viewer of the browser test (tests/test_ohif.py): the prebuilt @ohif/app from the
# npm registry, pinned (3.13 cannot render mammograms with VOILUTFunction LINEAR).
OHIF_VERSION ?= 3.12.10
OHIF_CACHE := .cache/ohif-$(OHIF_VERSION)
STAMP := $(VENV)/.calcnode-installed
# The suite runs on every core (pytest-xdist); PYTEST_ARGS="-n 0" runs it serially.
PYTEST_ARGS ?= -n auto --dist loadgroup

.PHONY: help setup system-deps ohif test demo lint typecheck bench weights clean

help:
	@echo "make demo   - set up, then run the node end to end on phantom studies"
	@echo "make test   - set up, then run the test suite"
	@echo "make lint   - ruff check + format check;  make typecheck - mypy"
	@echo "make bench  - run the benchmarks in bench/ (slow)"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch already importable: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		echo "installing $(TORCH_PIN)"; $(PIP) install --quiet --no-compile "$(TORCH_PIN)"; \
	fi
	$(PIP) install --quiet --no-compile -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

# Debian packages the tests and the demo use; installed only when running as root
# and only those missing. Without root, the tests that need them are skipped with
# a reason.
system-deps:
	@missing=""; \
	command -v dcmdump >/dev/null || missing="$$missing dcmtk"; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	command -v Orthanc >/dev/null || missing="$$missing orthanc"; \
	test -f /usr/share/java/pixelmed.jar || missing="$$missing libpixelmed-java"; \
	test -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so || missing="$$missing orthanc-dicomweb"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	test -f /usr/share/java/DICOMscope.jar || missing="$$missing dicomscope"; \
	command -v javac >/dev/null || missing="$$missing default-jdk-headless"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = "0" ]; then \
			echo "installing Debian packages:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
		else \
			echo "not root: missing Debian packages$$missing (their tests will be skipped)"; \
		fi; \
	fi

# The pinned OHIF's built dist/ (about 40 MB once the source maps, the onnxruntime
# models and the microscopy viewer, which the test never loads, are removed). Without npm,
# or when the registry cannot be reached, the browser test is skipped with that reason.
ohif: $(OHIF_CACHE)/dist/index.html

$(OHIF_CACHE)/dist/index.html:
	@if ! command -v npm >/dev/null; then \
		echo "npm not found: OHIF not unpacked (tests/test_ohif.py will be skipped)"; exit 0; \
	fi; \
	rm -rf $(OHIF_CACHE) && mkdir -p $(OHIF_CACHE) && \
	if (cd $(OHIF_CACHE) && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null); then \
		tar -xzf $(OHIF_CACHE)/ohif-app-$(OHIF_VERSION).tgz -C $(OHIF_CACHE) \
			--strip-components=1 package/dist && \
		rm -rf $(OHIF_CACHE)/dist/ort $(OHIF_CACHE)/dist/dicom-microscopy-viewer && \
		find $(OHIF_CACHE)/dist -name '*.map' -delete && \
		rm -f $(OHIF_CACHE)/ohif-app-$(OHIF_VERSION).tgz; \
	else \
		echo "npm pack @ohif/app@$(OHIF_VERSION) failed (tests/test_ohif.py will be skipped)"; \
		rm -rf $(OHIF_CACHE); \
	fi

test:
	@$(MAKE) --no-print-directory -j3 --output-sync=target setup system-deps ohif
	$(PY) -m pytest $(PYTEST_ARGS)

demo:
	@$(MAKE) --no-print-directory -j2 --output-sync=target setup system-deps
	$(VENV)/bin/calcnode demo --out demo-out

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

bench: setup system-deps
	$(PY) bench/phantom_realism.py

# Reproduces the bundled weights (cascade/weights/) on a CPU: phantoms, the proposal
# network, FPR on its candidates, export, and the operating point the node reports at
# (chosen on the validation phantoms for TARGET_FP false positives per image). About 1 h
# on 2 cores. The bundled proposal
# network is the cross-entropy U-Net (it beat the t-test ASN on the validation phantoms
# in the CPU budget, docs/model-card.md); PROPOSAL_ARGS= (empty) trains the ASN of the
# cpu preset (t-test β 0.8, residual head) instead. PRESET=paper for the paper-size
# networks on a GPU. DATA, RUNS and WEIGHTS_OUT move the folders (a dry run:
# make weights PRESET=tiny TRAIN_COUNT=6 VAL_COUNT=2 DATA=/tmp/d RUNS=/tmp/r WEIGHTS_OUT=/tmp/w).
PRESET ?= cpu
PROPOSAL_ARGS ?= --loss ce --epochs 6
TRAIN_COUNT ?= 80
VAL_COUNT ?= 16
DATA ?= data
RUNS ?= runs
WEIGHTS_OUT ?= cascade/weights
TARGET_FP ?= 1.0
CALCNODE := $(VENV)/bin/calcnode
weights: setup
	$(CALCNODE) phantom --out $(DATA)/train --count $(TRAIN_COUNT) --seed 1000 --quiet
	$(CALCNODE) phantom --out $(DATA)/val --count $(VAL_COUNT) --seed 2000 --quiet
	$(CALCNODE) train asn --manifest $(DATA)/train/manifest.jsonl \
		--val-manifest $(DATA)/val/manifest.jsonl \
		--out $(RUNS)/proposals --preset $(PRESET) --seed 0 $(PROPOSAL_ARGS)
	$(CALCNODE) train fpr --manifest $(DATA)/train/manifest.jsonl \
		--val-manifest $(DATA)/val/manifest.jsonl \
		--asn $(RUNS)/proposals/best.pt --out $(RUNS)/fpr --preset $(PRESET) --seed 0
	$(CALCNODE) train export --asn $(RUNS)/proposals/best.pt --fpr $(RUNS)/fpr/best.pt \
		--out $(WEIGHTS_OUT)
	$(CALCNODE) train calibrate --weights $(WEIGHTS_OUT) \
		--manifest $(DATA)/val/manifest.jsonl --target-fp $(TARGET_FP) --quiet

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache demo-out .cache/ohif-*
