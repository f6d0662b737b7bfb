# One command each, on a fresh machine: `make run`, `make test`, `make demo`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SOURCES := setup.cfg pyproject.toml $(shell find acestream_proxy twisted -name '*.py') \
	$(wildcard acestream_proxy/http/static/*)
TWISTD_ARGS ?=
# e.g. DEMO_ARGS="--listen tcp:8000" to let a TV on the LAN play the demo
DEMO_ARGS ?=
PYTEST_ARGS ?=
# e.g. BENCH_ARGS="--players 1,100 --duration 10 --peer 'acexy=...'" (see README.rst)
BENCH_ARGS ?=

.PHONY: run test demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstalled (not editable) whenever a source changes, so that twistd finds the
# installed plugins exactly as a user's installation would.  twistd's plugin
# cache is rebuilt then, not by the next twistd: rebuilding it imports every
# plugin module, Twisted's endpoints among them, which load the TLS stack
# before the daemon decides whether it needs it.
# `make test` installs the test extras too; `make run` only what running
# needs (.installed-run); `make demo` that and PyAV, which makes the demo's
# picture once (.installed-demo).
$(VENV)/.installed: $(BIN)/python $(SOURCES)
	$(BIN)/pip install -q '.[test]'
	$(BIN)/python -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
	@touch $@

$(VENV)/.installed-run: $(BIN)/python $(SOURCES)
	$(BIN)/pip install -q .
	$(BIN)/python -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
	@touch $@

$(VENV)/.installed-demo: $(BIN)/python $(SOURCES)
	$(BIN)/pip install -q '.[demo]'
	$(BIN)/python -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
	@touch $@

run: $(VENV)/.installed-run
	$(BIN)/twistd -n aceproxy $(TWISTD_ARGS)

# The status page's tests render it in a headless Chromium (Debian's
# package, installed as root when missing); contrib/test-tools.sh installs
# haproxy and nginx for tests/test_contrib.py where that is harmless (see
# there), otherwise those checks skip.
test: $(VENV)/.installed
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium; }
	@sh contrib/test-tools.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The demo's broadcast is H.264 and AAC, which VLC, mpv and the status
# page's player all play; DEMO_ARGS="--media FILE" plays another file, e.g.
# the MPEG-2 one `$(BIN)/python -m acestream_proxy.testing.demo_media
# --coding mpeg2 FILE` makes.
demo: $(VENV)/.installed-demo
	$(BIN)/python -m acestream_proxy.testing.demo $(DEMO_ARGS)

# One table: every target at 1, 100, 300 and 1000 players, measured in the same run.
bench: $(VENV)/.installed
	$(BIN)/python bench/fanout.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
