# Two entry points (README Quickstart): `make pipeline` and `make test`.
# Both create .venv on first use. torch/torchvision are pinned in pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: venv pipeline test lint ui metrics plots clean-venv

# Supported: the range of pyproject's requires-python (torch 2.14.1 has wheels for 3.10-3.13).
PYTHON_CHECK := import sys; v = sys.version_info[:2]; \
	sys.exit(0 if (3, 10) <= v < (3, 14) else "rnnlab needs Python 3.10-3.13 (torch 2.14.1 has wheels for those); %s is %d.%d. Install one (Debian 13 / Ubuntu 24.04: apt install python3 python3-venv; elsewhere: pyenv install 3.12) and run: make PYTHON=python3.12 ..." % ((sys.executable,) + v))

$(BIN)/rnnlab: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -c '$(PYTHON_CHECK)'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(BIN)/rnnlab

venv: $(BIN)/rnnlab

## Run the whole pipeline (download -> prepare -> train -> evaluate) with params.yaml.
pipeline: venv
	dvc repro
	dvc metrics show

## Run the test suite (unit, data, model and pipeline tests on the real corpora mirror).
## TEST_WORKERS processes (pytest-xdist; default: one per core), a test file's tests in one process so
## its module fixtures (one tiny `dvc repro`) are built once; TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= auto
test: venv
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

## Lint and format check (what CI runs first); `pre-commit install` runs the same on every commit.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## Browse MLflow runs on http://127.0.0.1:$(UI_PORT) (the repo's store, or $$MLFLOW_TRACKING_URI)
UI_PORT ?= 5000
ui: venv
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=$${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} mlflow ui --backend-store-uri "$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db}" --host 127.0.0.1 --port $(UI_PORT)

metrics: venv
	dvc metrics show

plots: venv
	dvc plots show

clean-venv:
	rm -rf $(VENV)

## Team tracking server: PostgreSQL + `mlflow server` on 127.0.0.1 (README "Scaling"; scripts/tracking-server --help).
## `make tracking-server` starts it; TRACKING=stop|status|restart|env, TRACKING_ARGS=--auth etc.
TRACKING ?= start
.PHONY: tracking-server
tracking-server: venv
	scripts/tracking-server $(TRACKING_ARGS) $(TRACKING)
