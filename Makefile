# make demo: generate from the embedded builtin:digits model, prune it 2:4 with OBS-Diff, evaluate both
# make test: ruff + pytest
# Both create the virtual environment on first use (about 2 minutes, 1.7 GB).

VENV ?= .venv
PYTHON ?= python3
# The CPU wheel; on a CUDA machine use e.g. `make test TORCH_SPEC=torch` to keep your CUDA build.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.obsdiff-installed

.PHONY: demo test lint install clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/obsdiff info
	$(VENV)/bin/obsdiff generate --model builtin:digits --prompt "a handwritten digit seven" --seed 0 \
		--out runs/demo/seven.png --force
	$(VENV)/bin/obsdiff eval --model builtin:digits --num-images 200 --out runs/demo/dense-eval --force
	$(VENV)/bin/obsdiff prune --model builtin:digits --method obs-diff --sparsity-type 2:4 \
		--out runs/demo/digits-2of4 --force
	$(VENV)/bin/obsdiff eval runs/demo/digits-2of4 --reference builtin:digits --num-images 200 --force

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# One test file per worker process (module fixtures are built once); every worker runs single-threaded.
TEST_WORKERS ?= 2

test: lint
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile

clean-venv:
	rm -rf $(VENV)
