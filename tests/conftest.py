"Fixtures shared by the integration tests: the real archive, the data converted from it, a clean environment."
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cifar10.data import ARCHIVE_URL, cache_dir

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
    "The real CIFAR-10 archive: $CIFAR10_ARCHIVE, else the copy in ../shared, else `cifar10 data`'s download."
    downloaded = cache_dir()/Path(ARCHIVE_URL).name  # where find_archive keeps it
    path = Path(os.environ.get('CIFAR10_ARCHIVE') or (SHARED_ARCHIVE if SHARED_ARCHIVE.exists() else downloaded))
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


def sh(*cmd, cwd, env=None, ok: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    "Run `cmd` in `cwd` (with the project's tools first on PATH); unless `ok` is False, it must succeed."
    result = subprocess.run(list(map(str, cmd)), cwd=cwd, env=env or cli_env(), capture_output=True, text=True,
                            timeout=timeout)
    if ok: assert result.returncode == 0, f'{cmd}: {result.stdout[-3000:]}\n{result.stderr[-3000:]}'
    return result


def git_commit(repo: Path, message: str):
    "`git add -A` and commit everything in `repo`, as a test user."
    sh('git', 'add', '-A', cwd=repo)
    sh('git', '-c', 'user.name=test', '-c', 'user.email=test@example.com', 'commit', '-qm', message, cwd=repo)


def dvc_repo(folder: Path, params: str) -> Path:
    """A git repository in `folder` with the project's DVC pipeline, as a clone has it: dvc.yaml, .dvc/ (no
    cache), the package, nbs/train.ipynb, an empty models/, and `params` as params.yaml; committed."""
    folder.mkdir(parents=True)
    for name in ('dvc.yaml', '.dvcignore', 'settings.ini'): shutil.copy(ROOT/name, folder/name)
    shutil.copytree(ROOT/'.dvc', folder/'.dvc', ignore=shutil.ignore_patterns('cache', 'tmp', 'config.local'))
    shutil.copytree(ROOT/'cifar10', folder/'cifar10', ignore=shutil.ignore_patterns('__pycache__'))
    (folder/'nbs').mkdir(); shutil.copy(ROOT/'nbs'/'train.ipynb', folder/'nbs')
    (folder/'models').mkdir(); (folder/'models'/'.gitkeep').touch()
    (folder/'params.yaml').write_text(params)
    sh('git', 'init', '-q', cwd=folder)
    git_commit(folder, 'the pipeline')
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float = 120):
    "Wait until `url` answers; fail the test with the end of `log` if `process` exits or `timeout` seconds pass."
    from cifar10.serve import wait_until_healthy as answers  # the server's own: it prints its address after it
    if not answers(url, timeout, process): pytest.fail(f'{url} did not answer: {log.read_text()[-2000:]}')


def stop(process: subprocess.Popen, timeout: float = 60):
    "SIGTERM to the process group of `process` (started with `start_new_session=True`); SIGKILL if it lingers."
    os.killpg(process.pid, signal.SIGTERM)
    try: process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


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
        wait_until_healthy(f'{url}/health', server, folder/'server.log')
        yield url
    finally: stop(server)


# Chromium as a test runs it: as root (no sandbox), without a GPU, without trying the network on its own, and able
# to reach nothing but this machine (no proxy; no host resolves but localhost and 127.0.0.1)
CHROMIUM_FLAGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                  '--disable-background-networking', '--disable-component-update', '--disable-sync',
                  '--no-proxy-server', '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1']


@pytest.fixture(scope='session')
def browser():
    "A real headless Chromium (Debian's `chromium`), driven by Playwright; each launch has a fresh profile folder."
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=shutil.which('chromium'), args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@contextlib.contextmanager
def cifar10_server(*flags, log: Path, timeout: float = 180):
    "`cifar10 serve *flags` on a free loopback port, in its own process group, output to `log`: (process, URL)."
    port = free_port()
    with open(log, 'w') as output:  # a file, not a pipe: a server that writes a lot can't block on it
        process = subprocess.Popen([CLI, 'serve', *map(str, flags), '--port', str(port)], env=cli_env(),
                                   stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    url = f'http://127.0.0.1:{port}'
    try:
        wait_until_healthy(f'{url}/health', process, log, timeout)
        yield process, url
    finally:
        with contextlib.suppress(ProcessLookupError): os.killpg(process.pid, signal.SIGKILL)  # whatever is left
        process.wait(timeout=30)


@pytest.fixture(scope='session')
def trained(tiny_data, tmp_path_factory):
    "A run of the smoke preset on the tiny data, exported to float32 ONNX: (models folder, run name)."
    folder = tmp_path_factory.mktemp('trained')
    result = run_cli('train', '--config', ROOT/'conf'/'smoke.yaml', '--data.data_dir', tiny_data,
                     '--data.subset', 'null', '--training.models_dir', folder/'models',
                     '--logging.tracking_uri', f'sqlite:///{folder}/mlflow.db', '--logging.run_name', 'small',
                     cwd=folder)
    assert result.returncode == 0, result.stderr
    exported = run_cli('export', '--checkpoint_name', 'small', '--models_dir', folder/'models', '--data_dir', tiny_data)
    assert exported.returncode == 0, exported.stderr
    (folder/'export.txt').write_text(exported.stdout)  # what `cifar10 export` reported, for the tests to read
    return folder/'models', 'small'


@pytest.fixture(scope='session')
def picture(data_dir):
    "A function of `index`, `size`, `format`, `mode`: that test image of the real data, resized, as a file's bytes."
    import io

    import numpy as np
    from PIL import Image

    from cifar10.data import load_split
    images, _ = load_split(data_dir, 'test')
    def encode(index: int, size=(32, 32), format='PNG', mode='RGB') -> bytes:
        image = Image.fromarray(np.array(images[index]).transpose(1, 2, 0)).resize(size).convert(mode)
        buffer = io.BytesIO(); image.save(buffer, format); return buffer.getvalue()
    return encode
