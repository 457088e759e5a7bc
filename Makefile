# The two commands of the README: `make demo` and `make test`. Both create the virtual
# environment and install the package with the tested versions (constraints.txt) first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test bench bench-architectures bench-budget bench-hub bench-quick lint format model-cards clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/hf-ntl demo --output_dir runs/demo

# Regenerates model_cards/ from the reference runs (about 10 minutes on 2 CPU cores once the source model is fitted).
model-cards: $(STAMP)
	$(BIN)/python scripts/reference_cards.py --runs runs/reference --cards model_cards

# Protection quality on every pair of the three embedded digit domains (tiny-resnet), diffusion and cost into
# benchmarks/: about an hour on 2 CPU cores from nothing (60.5 minutes, part of it on a shared CPU;
# benchmarks/results.md says what each section took). Finished stages in runs/bench are reused. Not part of
# `make test`.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py --runs_dir runs/bench --output_dir benchmarks \
		--sections quality diffusion cost

# After `make bench`: is scratch converged? Scratch at twice every attack's budget against the bench's scratch runs.
bench-budget: $(STAMP)
	$(BIN)/python benchmarks/bench.py --runs_dir runs/bench --output_dir benchmarks/budget --sections budget

# The first pair on the ConvNeXt preset against scratch ConvNeXt (about an hour on 2 CPU cores; the ViT preset's own
# source fit alone takes 68 minutes, so it is only run when named: --architectures tiny-vit tiny-convnext).
bench-architectures: $(STAMP)
	$(BIN)/python benchmarks/bench.py --runs_dir runs/bench --output_dir benchmarks/architectures \
		--sections architectures

# Hub-scale architectures at 224 px (ResNet-18, ViT-Base, the ddpm-cifar10-32 UNet; random weights): step
# times and an audit's peak memory at two target train sizes. About an hour on 2 CPU cores.
bench-hub: $(STAMP)
	$(BIN)/python benchmarks/bench.py --runs_dir runs/bench-hub --output_dir benchmarks/hub --sections hub

# For iterating on a protection: six attacks the full bench's worst case often picks, one seed, quality only.
bench-quick: $(STAMP)
	$(BIN)/python benchmarks/bench.py --runs_dir runs/bench-quick --output_dir runs/bench-quick/results \
		--sections quality --seeds 0 --attacks adamw-wd2-cosine-2x full adamw-cosine-2x adamw-lr1e-4 sgdm-lr1e-2 lora-r16 full-masked

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
