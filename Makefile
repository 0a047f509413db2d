# Two commands on a fresh machine with only python3 and make: `make demo`, `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint typecheck docs bench bench-quota bench-supervisors bench-field readme clean

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

# mypy --strict on src/ (settings in pyproject.toml): py.typed promises users checked types.
typecheck: $(STAMP)
	$(BIN)/mypy

# The docs/ site (mkdocs.yml) built --strict into a scratch dir: a broken link or #anchor, or
# a page left out of the nav, fails it. To read it: .venv/bin/mkdocs serve (or build: site/).
docs: $(STAMP)
	site=$$(mktemp -d) && $(BIN)/mkdocs build --strict --site-dir "$$site"; \
	  status=$$?; rm -rf "$$site"; exit $$status

test: lint typecheck docs
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The unit tier: pure code, no worker process, service or cgroup; under a minute.
UNIT_TESTS := $(addprefix tests/test_,$(addsuffix .py,units config policy events \
	cgroup_parsing cli_help fast_job journal_reader diagnose report metrics brake layers))

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q $(UNIT_TESTS)

bench: $(STAMP)
	$(BIN)/python bench/check_overhead.py

# Side by side in real memory cgroups (Redis on localhost); rewrite docs/ tables, charts and
# the headline tables of docs/benchmarks.md. A few minutes each; run them on a quiet machine.
bench-quota: $(STAMP)
	$(BIN)/python bench/quota.py --rounds 3 --out docs --readme docs/benchmarks.md

bench-supervisors: $(STAMP)
	$(BIN)/python bench/supervisors.py --out docs --readme docs/benchmarks.md

# Every worker x every workload, default settings, a real memory cgroup per cell (issue 13);
# docs/field.md and the README's field table. About 25 minutes on two busy cores.
bench-field: $(STAMP)
	$(BIN)/python bench/field.py --out docs --readme README.md

# The settings table of docs/configuration.md (memwarden.config.Config) and the records
# tables of docs/journal.md (memwarden.records).
readme: $(STAMP)
	$(BIN)/python scripts/readme_settings.py
	$(BIN)/python scripts/journal_records.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
