# The two commands of the README: `make demo` and `make test`. Both create the virtual
# environment and install the package with the tested versions (constraints.txt) first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test bench lint format model-cards clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/hf-ntl demo --output_dir runs/demo

# Regenerates model_cards/ from the reference runs (about 20 minutes on 2 CPU cores).
model-cards: $(STAMP)
	$(BIN)/python scripts/reference_cards.py --runs runs/reference --cards model_cards

# Protection quality, diffusion and cost benchmarks into benchmarks/ (about 75 minutes on 2 CPU
# cores; finished stages in runs/bench are reused). Not part of `make test`.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py --runs_dir runs/bench --output_dir benchmarks

test: lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=8

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
