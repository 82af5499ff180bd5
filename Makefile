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

.PHONY: install browser test test-all demo lint format bench clean

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

# Every test except those marked slow (large presets at full size on CPU): see `make test-all`.
test: $(STAMP) browser
	$(PY) -m pytest -m "not slow" -q

test-all: $(STAMP) browser
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
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache *.egg-info
