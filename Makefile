# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export FIFTYONE_DO_NOT_TRACK := true
export FIFTYONE_DATABASE_VALIDATION := false
export RAY_USAGE_STATS_ENABLED := 0
DEMO_DIR ?= demo_output

.PHONY: install browser s3rver test test-all demo lint format bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# Headless Chromium for the review App's browser test (Debian's package; needs root and apt).
# Best effort: without it that one test is skipped and says why.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1)) ; } || \
	  echo "chromium not installed: the browser test will be skipped"

# A local S3-compatible server (s3rver, from npm) for the object-storage test, in .s3rver/.
# Best effort: without node and npm that test is skipped and says why.
S3RVER := .s3rver/node_modules/.bin/s3rver
s3rver:
	@test -x $(S3RVER) || { command -v npm >/dev/null && \
	  npm install --silent --no-audit --no-fund --prefix .s3rver s3rver@3.7.1 >/dev/null 2>&1 ; } || \
	  echo "s3rver not installed: the object-storage test will be skipped"

# Every test except those marked slow (large presets at full size on CPU): see `make test-all`.
test: $(STAMP) browser s3rver
	$(PY) -m pytest -m "not slow" -q

test-all: $(STAMP) browser s3rver
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m jobs.demo --workdir $(DEMO_DIR)

lint: $(STAMP)
	$(VENV)/bin/ruff check hipie pipeline jobs schemas tests bench
	$(VENV)/bin/ruff format --check hipie pipeline jobs schemas tests bench

format: $(STAMP)
	$(VENV)/bin/ruff format hipie pipeline jobs schemas tests bench
	$(VENV)/bin/ruff check --fix hipie pipeline jobs schemas tests bench

clean:
	rm -rf $(VENV) .s3rver $(DEMO_DIR) .pytest_cache .ruff_cache *.egg-info
