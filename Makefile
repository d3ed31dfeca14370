# The whole set-up on a fresh machine is `make serve` or `make test`: each creates .venv and
# installs the project into it on first use; a stamp file makes later calls take seconds.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: serve test test-ray lint install prometheus chromium docker-test docker-lock

# The integration tests run a real Prometheus server (Debian package `prometheus`, which brings promtool).
# Installed here when missing and apt-get can be used; elsewhere those tests skip and say why.
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; } || \
	  echo "prometheus not installed: its integration tests will skip"

# The browser tests (tests/test_ui.py) drive Debian's `chromium` with Playwright (a test extra), since Playwright's
# own browser download needs a network that is not there. Installed like prometheus; elsewhere those tests skip.
chromium:
	@command -v chromium >/dev/null || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium not installed: the browser tests will skip"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/tta serve

test: $(STAMP) prometheus chromium
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# Scale out on Ray Serve: a local Ray cluster, 2 replicas (tests/test_ray_scale.py, ~2 min); installs the .[ray] extra.
test-ray: $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,ray]'
	$(BIN)/python -m pytest -m ray

lint: $(STAMP)
	$(BIN)/ruff check .

# The image, built and run for real without a Docker engine (root; installs debootstrap, podman, buildah with
# apt-get when missing). Keeps the base image and /var/cache/tta-wheelhouse: ~9 min cold, ~6 min warm.
docker-test:
	bash docker/test.sh

# Re-pin docker/requirements.lock after changing dependencies in pyproject.toml.
docker-lock: $(STAMP)
	bash docker/lock.sh $(BIN)/python
