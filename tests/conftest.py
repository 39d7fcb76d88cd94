"Fixtures shared by the integration tests: the real archive, the data converted from it, a clean environment."
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_ARCHIVE = ROOT.parent/'shared'/'cifar10'/'cifar-10-python.tar.gz'
VENV_BIN = Path(sys.executable).parent  # the project's environment: its console scripts, dvc, nbdev_*
CLI = str(VENV_BIN/'cifar10')


def cli_env(**extra) -> dict:
    "The environment for a subprocess: this one, the project's tools first on PATH, telemetry off, and `extra`."
    return {**os.environ, 'PATH': f'{VENV_BIN}:{os.environ["PATH"]}', 'MLFLOW_DISABLE_TELEMETRY': 'true',
            'DVC_NO_ANALYTICS': '1', **extra}


def run_cli(*args, cwd=ROOT, env=None, timeout=600) -> subprocess.CompletedProcess:
    "Run `cifar10 *args` in a subprocess, as a user would, and return the finished process."
    return subprocess.run([CLI, *map(str, args)], cwd=cwd, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='session')
def archive() -> Path:
    "The real CIFAR-10 archive: $CIFAR10_ARCHIVE, else the copy in ../shared beside the repo."
    path = Path(os.environ.get('CIFAR10_ARCHIVE') or SHARED_ARCHIVE)
    if not path.is_file():
        pytest.fail(f'no CIFAR-10 archive at {path}: set CIFAR10_ARCHIVE to a cifar-10-python.tar.gz')
    return path


@pytest.fixture(scope='session')
def data_dir(archive, tmp_path_factory) -> Path:
    "A data folder written by `cifar10 data` from the real archive, in a subprocess."
    folder = tmp_path_factory.mktemp('converted')/'data'
    result = run_cli('data', '--archive', archive, '--data_dir', folder)
    assert result.returncode == 0, result.stderr
    return folder
