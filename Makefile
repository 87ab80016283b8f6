# The two commands of the quick start: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch; real users get a range from pyproject.toml.
TORCH_PIN := torch==2.13.0

.PHONY: install test lint demo train-demo clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src weights_convert tests benchmarks
	$(VENV)/bin/ruff format --check src weights_convert tests benchmarks

# The bundled tiny model (src/minillava/assets/shapes) answering about a bundled image, offline.
demo: install
	$(VENV)/bin/minillava generate --image src/minillava/assets/shapes/example-1.png --prompt "Describe the image briefly."

# Rebuild the bundled model from its seed, bit for bit on the same CPU (two threads, about 28 minutes here; the
# weights depend on the thread count, see docs/bundled-model.md).
train-demo: install
	OMP_NUM_THREADS=2 $(PY) -m minillava.shapes.recipe

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
