# Two commands set up a fresh machine (see README.md): `make run` and `make test`.
# Both install what is missing first: redis-server (and wrk, tmux) with apt-get, the package
# and its test extra in a virtual environment under .venv.

VENV ?= .venv
PY := $(VENV)/bin/python
SYSTEM_PACKAGES := redis-server wrk tmux npm  # each package installs a command of the same name (tmux: tests/test_ctl_top.py; npm, with node: tests/test_segment_sdks.py)
# written by npm ci: the Node SDK tests/test_segment_sdks.py drives is installed
NODE_SDK := tests/node/node_modules/.package-lock.json

.PHONY: run test bench package system-deps test-deps

run: $(VENV)/.installed system-deps
	$(VENV)/bin/meteorit -c conf/meteorit.toml

test: $(VENV)/.installed system-deps test-deps $(NODE_SDK)
	$(PY) -m pytest

bench: $(VENV)/.installed system-deps
	$(PY) bin/meteorit-bench

package:  # dist/: sdist, wheel and meteorit_VERSION-1_ARCH.deb (see bin/meteorit-package)
	bin/meteorit-package

# the Segment Node SDK tests/test_segment_sdks.py drives, as locked in tests/node/package-lock.json
$(NODE_SDK): tests/node/package-lock.json | test-deps
	cd tests/node && npm ci --no-audit --no-fund

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test-deps:  # what only the tests need: PostgreSQL, Chromium, systemd-analyze, node, tmux (tests/system-deps)
	tests/system-deps

system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing with apt-get"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
