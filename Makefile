# The two set-up commands of the README: `make run` and `make test`. Both are idempotent:
# the venv is rebuilt only when pyproject.toml or the lock file changes.
SHELL := /bin/bash
VENV ?= .venv
PYTHON_BOOTSTRAP ?= python3.11
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-stamp
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := False
PYTEST_ARGS ?=
# The real Taobao sample (never committed: its licence is the owner's) is found through this variable; a
# development or CI checkout has it in ../shared/data. Without it the real-sample tests skip, saying why.
SAMPLE_DIR_DEFAULT := $(abspath ../shared/data)
ifneq ($(wildcard $(SAMPLE_DIR_DEFAULT)/taobao_userbehavior_sample.csv),)
export USERVALUE_SAMPLE_DIR ?= $(SAMPLE_DIR_DEFAULT)
endif

MLFLOW_PORT ?= 5000
USERVALUE_PORT ?= 3000
AIRFLOW_PORT ?= 8080

.PHONY: install run test test-fast bench mlflow-ui serve airflow clean help

help:
	@echo "make run        install, then dvc repro on the embedded default (CDNOW)"
	@echo "make test       install, then the whole test suite"
	@echo "make test-fast  the suite without the slow end-to-end tests"
	@echo "make bench      benchmarks (figures printed, never asserted)"
	@echo "make mlflow-ui  the MLflow UI on http://127.0.0.1:$(MLFLOW_PORT) (runs, metrics, registry)"
	@echo "make serve      the built Bento (the champion) on http://127.0.0.1:$(USERVALUE_PORT)"
	@echo "make airflow    Airflow (retrain + monitor DAGs) on http://127.0.0.1:$(AIRFLOW_PORT), home in .airflow/"

$(STAMP): pyproject.toml requirements/constraints.txt
	@test -x $(BIN)/python || $(PYTHON_BOOTSTRAP) -m venv $(VENV)
	# pip (not uv): it finds the local torch wheel; the lock keeps every version fixed.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		-c requirements/constraints.txt -e '.[test]'
	@touch $@

# `dvc plots show` uses this template (.dvc/config plots.html_template): Vega inlined from the
# vl-convert-python wheel, so the page renders offline. Generated, not committed (about 0.9 MB).
DVC_PLOTS_TEMPLATE := .dvc/plots-template.html
$(DVC_PLOTS_TEMPLATE): $(STAMP)
	@mkdir -p $(dir $@)
	$(BIN)/uservalue offline-assets --dvc-template $@

install: $(STAMP) $(DVC_PLOTS_TEMPLATE)

run: install
	@test -d .git || git init --quiet
	@test -d .dvc || dvc init --quiet
	dvc repro

# lint-imports: the architecture contracts in pyproject.toml ([tool.importlinter]).
test: install
	lint-imports
	python -m pytest $(PYTEST_ARGS)

test-fast: install
	lint-imports
	python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install
	python bench/featurize.py
	python bench/cdnow_quality.py
	python bench/serve.py
	python bench/load.py
	python bench/dag_parse.py

# The embedded default store (params tracking.uri: null): SQLite in the project, artifacts in ./mlartifacts.
mlflow-ui: install
	mlflow ui --backend-store-uri "$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db}" \
		--default-artifact-root "$(CURDIR)/mlartifacts" --host 127.0.0.1 --port $(MLFLOW_PORT)

# The Bento built by `make run` (stage package); USERVALUE_API_KEY=... makes it require a key.
serve: install
	uservalue serve --port $(USERVALUE_PORT)

# Airflow standalone for this project: AIRFLOW_HOME=.airflow (git-ignored), SQLite, LocalExecutor,
# parallelism 4, 127.0.0.1, no examples; the admin password is generated once into .airflow/.
airflow: install
	uservalue airflow --port $(AIRFLOW_PORT)

clean:
	rm -rf $(VENV) .pytest_cache
