# The two commands of the README:
#   make book    set up (.venv, vendored JS) and build the site into _build/html   (zero warnings allowed)
#   make test    set up, then: unit tests, nbval on every notebook in _toc.yml, book build, browser check
# Both create what they need on a fresh machine with Python 3.11, make and npm (make test also installs
# Debian's chromium and chromium-driver with apt-get when they are missing).
#
# Single steps (each sets up first):
#   make test-notebook NB=book/quickstart.ipynb   re-run one notebook under nbval (strict)
#   make run-notebook NB=book/quickstart.ipynb    re-execute one notebook, storing its outputs
#   make site-check                               browser check of an already built site
#   make clean                                    remove _build (keeps .venv and _vendor)

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
ROOT := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := $(ROOT)/.venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mlcore-installed
VENDOR_STAMP := $(ROOT)/_vendor/.fetched
SANITIZE := $(ROOT)/nbval_sanitize.cfg
NBVAL_CELL_TIMEOUT ?= 1200

# Omniglot: use $MLCORE_OMNIGLOT when set, else the shared copy beside a clean clone.
SHARED_OMNIGLOT := $(abspath $(ROOT)/../shared/data/omniglot)
ifeq ($(origin MLCORE_OMNIGLOT),undefined)
  ifneq ($(wildcard $(SHARED_OMNIGLOT)),)
    export MLCORE_OMNIGLOT := $(SHARED_OMNIGLOT)
  endif
endif
# Reproducible notebook kernels (nbval starts them with this environment).
export PYTHONHASHSEED := 0
export JUPYTER_PLATFORM_DIRS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Notebook kernels compute convolutions with CPU kernels whose rounding does not depend on the
# processor (the stored outputs then do not depend on the CI machine's CPU): PORTABLE_CPU_ENV in mlcore.notebook,
# which scripts/run_notebook.py sets too. Only the notebook stages get it: unit tests keep torch's
# default kernels, the ones a user of mlcore gets.
NB_ENV := MLCORE_PORTABLE_CPU=1

# $(call stage,NAME,COMMAND): run COMMAND in a subshell with errexit (not inside an `if`, where bash
# would ignore errexit), print its duration, record pass/fail in $$failed and $$summary. Later stages
# still run, and the target exits non-zero at the end if any stage failed.
define stage
	name='$(1)'; echo; echo "==> [$$name] started $$(date +%T)"; t0=$$(date +%s); \
	set +e; ( set -e; $(2) ); rc=$$?; set -e; \
	if [ $$rc = 0 ]; then r=ok; else r="FAILED($$rc)"; failed=1; fi; \
	dt=$$(( $$(date +%s) - t0 )); echo "<== [$$name] $$r in $${dt} s"; \
	summary+=$$(printf '  %-26s %-10s %5d s' "$$name" "$$r" "$$dt")$$'\n';
endef

.PHONY: help setup venv vendor browser book test unit nbval build site-check test-notebook run-notebook clean

help:
	@sed -n '1,13p' Makefile

setup: venv vendor

venv: $(STAMP)
$(STAMP): requirements.txt pyproject.toml
	@t0=$$(date +%s); \
	if [ ! -x "$(PY)" ]; then \
	  echo "==> creating $(VENV) with $(PYTHON)"; \
	  "$(PYTHON)" -m venv "$(VENV)"; \
	fi; \
	"$(PY)" -m pip install --quiet -r requirements.txt; \
	"$(PY)" -m pip install --quiet --no-deps -e .; \
	touch "$(STAMP)"; \
	echo "<== [setup: python env] $$(( $$(date +%s) - t0 )) s"

vendor: $(VENDOR_STAMP)
$(VENDOR_STAMP): scripts/fetch_js.sh
	@t0=$$(date +%s); bash scripts/fetch_js.sh _vendor; \
	echo "<== [setup: vendored JS] $$(( $$(date +%s) - t0 )) s"

# Debian's chromium and its matching driver (Selenium is given /usr/bin/chromedriver and never
# downloads a browser). Uses sudo when not root.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then exit 0; fi; \
	t0=$$(date +%s); sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	echo "==> installing chromium and chromium-driver with apt-get"; \
	$$sudo apt-get update -qq; \
	DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium chromium-driver >/dev/null; \
	echo "<== [setup: chromium] $$(( $$(date +%s) - t0 )) s"

# --- the book ---------------------------------------------------------------------------------
BUILD_CMD = "$(VENV)/bin/jupyter-book" build --all -W -n --keep-going . 2>&1 | tee _build/build.log; \
	if grep -qE "(WARNING|ERROR|CRITICAL):" _build/build.log; then echo "the build log has warnings (above)"; exit 1; fi

book: setup
	@mkdir -p _build; failed=0; summary=''; \
	$(call stage,book build,$(BUILD_CMD)) \
	[ $$failed = 0 ] && echo "site: $(ROOT)/_build/html/index.html"; exit $$failed

# --- the checks -------------------------------------------------------------------------------
UNIT_CMD = "$(PY)" -m pytest tests --ignore=tests/test_site.py --durations=10
NBVAL_CMD = nbs=$$("$(PY)" scripts/run_notebook.py --list); \
	if [ -z "$$nbs" ]; then echo "_toc.yml lists no notebooks: nothing for nbval to check"; exit 0; fi; \
	env $(NB_ENV) "$(PY)" -m pytest --nbval --nbval-current-env --nbval-sanitize-with "$(SANITIZE)" \
	  --nbval-cell-timeout=$(NBVAL_CELL_TIMEOUT) -p no:cacheprovider --durations=10 $$nbs
SITE_CMD = MLCORE_REQUIRE_SITE=1 "$(PY)" -m pytest tests/test_site.py -p no:cacheprovider

test: setup browser
	@mkdir -p _build; failed=0; summary=''; t_all=$$(date +%s); \
	$(call stage,unit tests (tests/),$(UNIT_CMD)) \
	$(call stage,notebooks (nbval),$(NBVAL_CMD)) \
	$(call stage,book build,$(BUILD_CMD)) \
	$(call stage,site check (browser),$(SITE_CMD)) \
	echo; echo "== make test summary =="; printf '%s' "$$summary"; \
	echo "  total (after setup)        $$(( $$(date +%s) - t_all )) s"; \
	if [ $$failed = 0 ]; then echo "ALL STAGES PASSED"; else echo "SOME STAGES FAILED"; fi; exit $$failed

# Single stages, for working on one thing.
unit: setup
	@$(UNIT_CMD)
nbval: setup
	@$(NBVAL_CMD)
build: setup
	@mkdir -p _build; $(BUILD_CMD)
site-check: setup browser
	@$(SITE_CMD)

test-notebook: setup
	@test -n "$(NB)" || { echo "usage: make test-notebook NB=book/name.ipynb"; exit 2; }
	env $(NB_ENV) "$(PY)" -m pytest --nbval --nbval-current-env --nbval-sanitize-with "$(SANITIZE)" \
	  --nbval-cell-timeout=$(NBVAL_CELL_TIMEOUT) -p no:cacheprovider $(NB)

run-notebook: setup
	@test -n "$(NB)" || { echo "usage: make run-notebook NB=book/name.ipynb"; exit 2; }
	"$(PY)" scripts/run_notebook.py $(NB)

clean:
	rm -rf _build
