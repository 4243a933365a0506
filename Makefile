# Everything a fresh machine needs: a .venv with torch at a tested pin (a CPU wheel that lies on
# disk here; a range would pull a multi-GB CUDA build), then the project with its extras.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test lint proto prometheus clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[text,test,bench,onnx]'
	touch $(STAMP)

install: $(STAMP)

# Debian's prometheus (and promtool) for the metrics and monitoring tests.
prometheus:
	@command -v promtool >/dev/null 2>&1 || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null; }

demo: install
	$(BIN)/python -m dynaroute demo

test: install prometheus
	$(BIN)/ruff check dynaroute tests benchmarks examples
	$(BIN)/python -m pytest -q -p no:cacheprovider

proto: install
	$(BIN)/python -m dynaroute.gateway.protogen

clean:
	rm -rf $(VENV) build *.egg-info
