# Every target builds its own virtual environment; nothing is installed outside it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# PyTorch is installed first, on its own: TORCH_SPEC is the requirement, TORCH_INDEX the index to take it from. Where
# pip finds no local CPU wheel, PyPI's plain `torch` is a multi-GB CUDA build; for the CPU build use
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
# and for a GPU, e.g., TORCH_INDEX=https://download.pytorch.org/whl/cu130 (the CUDA version your driver supports).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
SAMPLES ?= data/samples
DEMO_RUN ?= runs/demo-nuclei

.PHONY: venv test test-slow lint format demo bench bench-quality clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test,dev]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q -m "not slow" tests

test-slow: venv
	$(PY) -m pytest -q -m slow tests

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

format: venv
	$(VENV)/bin/ruff check --fix src tests benchmarks scripts
	$(VENV)/bin/ruff format src tests benchmarks scripts

demo: venv
	$(PY) -m scaleprotoseg data samples --out $(SAMPLES)
	$(PY) -m scaleprotoseg train -c configs/samples/nuclei_scaleprotoseg.yaml --run-dir $(DEMO_RUN)
	$(PY) -m scaleprotoseg evaluate $(DEMO_RUN)
	$(PY) -m scaleprotoseg analyze $(DEMO_RUN) all
	$(PY) -m scaleprotoseg report $(DEMO_RUN)
	@echo "Demo run: $(DEMO_RUN)  report: $(DEMO_RUN)/report/index.html"

bench: venv
	$(PY) benchmarks/run_all.py

bench-quality: venv
	$(PY) benchmarks/quality.py

clean:
	rm -rf $(VENV) .pytest_cache
