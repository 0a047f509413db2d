# Two commands on a fresh machine with only python3 and make: `make demo`, `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-quota bench-supervisors readme clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/memwarden demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/check_overhead.py

# Side by side in real memory cgroups (Redis on localhost); rewrite docs/ tables, charts and
# the README's headline tables. A few minutes each; run them on a quiet machine.
bench-quota: $(STAMP)
	$(BIN)/python bench/quota.py --rounds 3 --out docs --readme README.md

bench-supervisors: $(STAMP)
	$(BIN)/python bench/supervisors.py --out docs --readme README.md

readme: $(STAMP)
	$(BIN)/python scripts/readme_settings.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
