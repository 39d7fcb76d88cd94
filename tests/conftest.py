"Fixtures shared by the integration tests: the real archive, the data converted from it, a clean environment."
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
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


@pytest.fixture(scope='session')
def tiny_data(data_dir, tmp_path_factory) -> Path:
    "A data folder of the first 1,000 training and 500 test images of the real data: runs take seconds."
    import numpy as np

    from cifar10.data import load_split
    folder = tmp_path_factory.mktemp('tiny')/'data'
    for split, count in (('train', 1000), ('test', 500)):
        images, labels = load_split(data_dir, split)
        (folder/split).mkdir(parents=True)
        np.save(folder/split/'images.npy', images[:count]); np.save(folder/split/'labels.npy', labels[:count])
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='session')
def mlflow_server(tmp_path_factory):
    "A real MLflow tracking server (SQLite backend, local artifact store) on a free loopback port; yields its URL."
    folder = tmp_path_factory.mktemp('mlflow-server')
    port = free_port()
    with open(folder/'server.log', 'w') as log:  # the server keeps its own copy of the file open
        server = subprocess.Popen([str(VENV_BIN/'mlflow'), 'server', '--host', '127.0.0.1', '--port', str(port),
                                   '--backend-store-uri', f'sqlite:///{folder}/mlflow.db',
                                   '--artifacts-destination', str(folder/'artifacts'), '--workers', '1'],
                                  cwd=folder, env=cli_env(), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    url = f'http://127.0.0.1:{port}'
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f'{url}/health', timeout=2): break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f'mlflow server did not start: {(folder/"server.log").read_text()[-2000:]}')
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
