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

.PHONY: install data train test lint clean-notebooks readme mlflow

# (re)install when the requirements change; the marker lives in the venv, so a fresh clone always installs
$(VENV)/.installed: settings.ini setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

data: install
	$(if $(CIFAR10_LOCAL_ARCHIVE),CIFAR10_ARCHIVE=$(CIFAR10_LOCAL_ARCHIVE)) cifar10 data

train: data
	cifar10 train $(if $(CONFIG),--config $(CONFIG))

test: install
	ruff check .
	CIFAR10_ARCHIVE=$(CIFAR10_LOCAL_ARCHIVE) cifar10 data
	nbdev_test --n_workers 1
	CIFAR10_ARCHIVE=$(CIFAR10_LOCAL_ARCHIVE) pytest -q tests

# A real MLflow server over the same store `cifar10 train` uses by default (mlflow.db, mlartifacts/):
# the UI at http://127.0.0.1:8080 shows every run; train against it with
# `--logging.tracking_uri http://127.0.0.1:8080` or MLFLOW_TRACKING_URI=http://127.0.0.1:8080.
mlflow: install
	mlflow server --host 127.0.0.1 --port 8080 --backend-store-uri sqlite:///mlflow.db --artifacts-destination mlartifacts

lint: install
	ruff check .

clean-notebooks: install
	nbdev_clean

# README.md is nbs/index.ipynb as markdown (nbdev_readme would need Quarto); links to chapters point into nbs/
readme:
	jupyter nbconvert --log-level WARN --to markdown --stdout nbs/index.ipynb \
	  | sed -E 's/\]\(([0-9a-z_]+\.ipynb)\)/](nbs\/\1)/g' > README.md.tmp && mv README.md.tmp README.md
