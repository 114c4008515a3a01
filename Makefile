# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
# the oldest transformers tokcomp supports, installed over .venv's packages (see test-oldest)
OLDEST_TRANSFORMERS := 5.17.0
OLDEST := .venv/oldest-transformers-$(OLDEST_TRANSFORMERS)
LMMS_EVAL := 0.7.3
# synthetic samples of the demo's accuracy table: 12 of each question type, the demo in about a minute
DEMO_SAMPLES := 60
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-oldest lint clean gpu-wheels

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: a bare `torch` requirement would pull several GB of CUDA packages.
	$(BIN)/python -m pip install -q -c constraints.txt torch
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test,eval,ray]"
	# lmms-eval without its own requirements: the eval extra has what it imports (see pyproject.toml)
	$(BIN)/python -m pip install -q --no-deps "lmms-eval==$(LMMS_EVAL)"
	touch $(STAMP)

# Efficiency on the tiny random model, then accuracy next to TTFT and FLOPs on the synthetic set with the
# trained tiny model (bundled; a second `make demo` finds the finished evaluation and only prints it).
demo: $(STAMP)
	$(BIN)/tokcomp run experiments/quickstart.yaml
	$(BIN)/tokcomp compare experiments/quickstart.yaml
	$(BIN)/tokcomp data synth --out results/synth --n $(DEMO_SAMPLES) --seed 1
	$(BIN)/tokcomp eval experiments/synth_eval.yaml --data results/synth/data.jsonl

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup tests

# Without the real-size model tests (`-m slow`: the 0.5B and 3B dimensions); `make test` runs them too.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not slow" tests

# The same suite against the oldest supported transformers: it and the huggingface_hub major it needs
# (<2, with httpx) go into a --target folder put first on PYTHONPATH; everything else is .venv's.
$(OLDEST)/.installed: $(STAMP)
	rm -rf $(OLDEST)
	$(BIN)/python -m pip install -q --no-deps --target $(OLDEST) "transformers==$(OLDEST_TRANSFORMERS)" \
		"huggingface_hub>=1.5,<2" "httpx>=0.23,<1" "httpcore>=1,<2"
	touch $@

test-oldest: $(OLDEST)/.installed
	PYTHONPATH=$(CURDIR)/$(OLDEST) $(BIN)/python -c "import transformers; assert transformers.__version__ == '$(OLDEST_TRANSFORMERS)', transformers.__version__"
	PYTHONPATH=$(CURDIR)/$(OLDEST) $(BIN)/python -m pytest -q -n 2 --dist loadgroup -p no:cacheprovider tests

# What benchmarks/gpu_check.sh installs on a GPU machine that reaches no registry: the packages tokcomp imports
# that its image lacks (omegaconf; pure Python), at .venv's versions, into .whl/ (git-ignored) to carry along.
gpu-wheels: $(STAMP)
	rm -rf .whl
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: -d .whl \
		"omegaconf==$$($(BIN)/python -c 'import omegaconf; print(omegaconf.__version__)')"

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) results
