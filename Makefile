# Two commands set everything up on a fresh machine:
#   make play   - install, then play Genie-v0 on the shipped model (headless: records a clip)
#   make test   - install, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch; a plain `torch` requirement would pull several GB of CUDA packages.
TORCH  ?= torch==2.13.0

.PHONY: install play test lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev,record]"
	touch $@

install: $(BIN)/.installed

play: install
	$(BIN)/genie-play $(ARGS)

test: install
	$(BIN)/python -m pytest tests $(ARGS)

lint: install
	$(BIN)/ruff check genie_env training tests examples

clean:
	rm -rf $(VENV) build *.egg-info
