# The two commands of README.md, each runnable on a fresh clone:
#   make train   set up, get CIFAR-10, train on the embedded defaults (CONFIG=conf/cpu.yaml to pick a preset)
#   make test    set up and run the whole test suite (what CI runs, through .ci/run)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
CONFIG ?=
export PATH := $(BIN):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
# the archive: $CIFAR10_ARCHIVE, else a copy in ../shared beside the clone, else (for `cifar10 data` without
# either) the official download
SHARED_ARCHIVE := $(abspath ../shared/cifar10/cifar-10-python.tar.gz)
export CIFAR10_LOCAL_ARCHIVE := $(or $(CIFAR10_ARCHIVE),$(wildcard $(SHARED_ARCHIVE)))

.PHONY: install data train test test-fast lint clean-notebooks readme mlflow container-tools browser-tools docs postgres-server mlflow-postgres

# (re)install when the requirements change; the marker lives in the venv, so a fresh clone always installs
$(VENV)/.installed: settings.ini setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# JupyterLab reads the project's server settings from the environment: notebooks open unmodified and save clean
$(VENV)/etc/jupyter/jupyter_server_config.py: jupyter_server_config.py $(VENV)/.installed
	install -D -m 644 $< $@

install: $(VENV)/.installed $(VENV)/etc/jupyter/jupyter_server_config.py

# the DVC pipeline's prepare stage (`cifar10 data`), so that dvc.lock records the data and `dvc exp run` reuses it
data: install
	$(if $(CIFAR10_LOCAL_ARCHIVE),CIFAR10_ARCHIVE=$(CIFAR10_LOCAL_ARCHIVE)) dvc repro prepare

train: data
	cifar10 train $(if $(CONFIG),--config $(CONFIG))

test: install container-tools postgres-server browser-tools
	ruff check .
	CIFAR10_ARCHIVE=$(CIFAR10_LOCAL_ARCHIVE) cifar10 data
	nbdev_test --n_workers 1
	CIFAR10_ARCHIVE=$(CIFAR10_LOCAL_ARCHIVE) pytest -q tests

# The tests not marked slow (a few minutes; none of them needs a browser, a container engine or PostgreSQL)
test-fast: install
	ruff check .
	CIFAR10_ARCHIVE=$(CIFAR10_LOCAL_ARCHIVE) cifar10 data
	CIFAR10_ARCHIVE=$(CIFAR10_LOCAL_ARCHIVE) pytest -q -m 'not slow' tests

# What tests/test_containers.py needs from Debian's packages, installed where missing (as root): podman, runc (crun,
# podman's default, cannot start containers in a sandbox like CI's; docker/containers.conf picks runc) and
# debootstrap (docker/base-image.sh builds the base image with it, as no registry can be reached)
container-tools:
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
	       podman runc debootstrap >/dev/null; }

# The browser tests/test_browser.py drives: Debian's chromium, installed where missing (as root); Playwright (a dev
# requirement) runs it as it is and downloads no browser of its own
browser-tools:
	@command -v chromium >/dev/null \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
	       chromium >/dev/null; }

# A real MLflow server over the same store `cifar10 train` uses by default (mlflow.db, mlartifacts/), on
# PORT (make mlflow PORT=8081). It first prints the link to the runs table of the cifar10 experiment in MLflow
# 3's "Model training" view (the UI opens on GenAI's otherwise); a new store gives that experiment the id 1.
# Train against it with `--logging.tracking_uri http://127.0.0.1:PORT` or MLFLOW_TRACKING_URI=http://127.0.0.1:PORT.
PORT ?= 8080
mlflow: install
	@python -c "import mlflow; e = mlflow.MlflowClient('sqlite:///mlflow.db').get_experiment_by_name('cifar10'); \
	  print('the runs of the cifar10 experiment: http://127.0.0.1:$(PORT)/#/experiments/' \
	        + (e.experiment_id if e else '1') + '/runs?workflowType=machine_learning', flush=True)" 2>/dev/null
	mlflow server --host 127.0.0.1 --port $(PORT) --backend-store-uri sqlite:///mlflow.db --artifacts-destination mlartifacts

# The team's tracking server: the same MLflow server over a PostgreSQL database, serving the artifacts itself
# (--serve-artifacts; they are kept in ARTIFACTS on this machine), so that every machine logs its runs and
# models to one place. Create the database once (`createdb mlflow`; MLflow makes its tables), then
#   make mlflow-postgres DATABASE=postgresql+psycopg://USER:PASSWORD@DB-HOST:5432/mlflow HOST=0.0.0.0 PORT=5000 \
#     ALLOWED_HOSTS=THIS-MACHINE,THIS-MACHINE:5000
# and train on any machine with --logging.tracking_uri http://THIS-MACHINE:5000. ALLOWED_HOSTS: the names the
# other machines use for this one (MLflow answers only requests to localhost and private IPs without it).
DATABASE ?= postgresql+psycopg://localhost:5432/mlflow
ARTIFACTS ?= mlartifacts
HOST ?= 127.0.0.1
WORKERS ?= 4
ALLOWED_HOSTS ?=
mlflow-postgres: install
	mlflow server --host $(HOST) --port $(PORT) --workers $(WORKERS) --backend-store-uri $(DATABASE) \
	  --serve-artifacts --artifacts-destination $(ARTIFACTS) $(if $(ALLOWED_HOSTS),--allowed-hosts $(ALLOWED_HOSTS))

# PostgreSQL's server programs (Debian's package), which tests/test_scale.py runs on loopback for a shared
# Optuna study and the team's tracking server; installed where missing (as root)
postgres-server:
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
	       postgresql >/dev/null; }

lint: install
	ruff check .

clean-notebooks: install
	nbdev_clean

# The documentation site (_docs/) needs Quarto, which pip does not install: say so in one line rather than let
# nbdev_docs try sudo. `make readme` needs no Quarto.
docs: install
	@command -v quarto >/dev/null || { echo 'make docs: Quarto is not installed; get it from https://quarto.org/docs/get-started/ (make readme needs none)' >&2; exit 1; }
	nbdev_docs

# README.md is nbs/index.ipynb as markdown (nbdev_readme would need Quarto); links to chapters point into nbs/
readme:
	jupyter nbconvert --log-level WARN --to markdown --stdout nbs/index.ipynb \
	  | sed -E 's/\]\(([0-9a-z_]+\.ipynb)\)/](nbs\/\1)/g' > README.md.tmp && mv README.md.tmp README.md
