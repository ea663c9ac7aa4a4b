# The two README commands: `make demo` (install + run the offline mini pipeline) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: demo test install install-dev clean-cache

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# editable install: the Hydra configs in conf/ are read from the checkout
$(VENV)/.installed: pyproject.toml $(VENV)/bin/activate
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/bin/activate
	$(PIP) install -e ".[dev]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	WANDB_MODE=$${WANDB_MODE:-offline} HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} $(VENV)/bin/mass-exp

test: install-dev
	$(PY) -m pytest tests $(PYTEST_ARGS)

clean-cache:
	rm -rf outputs/cache
