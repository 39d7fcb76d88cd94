"""The data stage end to end: `cifar10 data` on the real archive and on every kind of bad input, the DVC
pipeline with a real local remote, and the device loader on the converted arrays."""
import contextlib
import functools
import hashlib
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, cli_env, dvc_repo, git_commit, run_cli, sh

from cifar10.config import config_to_yaml, load_config
from cifar10.data import CLASSES, MEAN, STD, Augment, DeviceLoader, load_split, synthetic_batches, write_archive


def test_converts_the_real_archive(data_dir):
    train_images, train_labels = load_split(data_dir, 'train')
    test_images, test_labels = load_split(data_dir, 'test')
    assert train_images.shape == (50_000, 3, 32, 32) and test_images.shape == (10_000, 3, 32, 32)
    assert train_images.dtype == np.uint8 and train_labels.dtype == np.int64
    assert np.bincount(train_labels).tolist() == [5000] * 10
    assert np.bincount(test_labels).tolist() == [1000] * 10
    assert test_labels[:5].tolist() == [3, 8, 8, 0, 6]  # cat, ship, ship, airplane, frog
    assert train_labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert isinstance(train_images, np.memmap)  # loading maps the file rather than reading it


# Every bad input gets one line on stderr, exit code 1, and leaves nothing in data/ or the cache.
good = synthetic_batches()
BAD_ARCHIVES = {
    'not gzip': b'this is not a gzip file',
    'truncated': lambda whole: whole[:len(whole) // 2],
    'tar without the batches': {'readme.html': {'nothing': 'here'}},
    'wrong shape': {**good, 'data_batch_4': {**good['data_batch_4'], 'data': np.zeros((10, 1024), np.uint8)}},
    'label out of range': {**good, 'test_batch': {**good['test_batch'], 'labels': [0] * 9 + [10]}},
    'forbidden global': {**good, 'data_batch_1': b'\x80\x02cos\nsystem\nX\x04\x00\x00\x00true\x85R.'},  # os.system
}
EXPECTED = {'not gzip': 'not a gzip file', 'truncated': 'unexpected end of data',
            'tar without the batches': 'data_batch_1', 'wrong shape': 'data_batch_4',
            'label out of range': 'test_batch: labels must lie in 0..9', 'forbidden global': 'os.system'}


def check_one_line_error(result, expected: str):
    "Exit code 1, no traceback, and the error in one line, the last (a progress bar may come before it)."
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr
    assert [o for o in lines if 'error:' in o] == lines[-1:] and expected in lines[-1], result.stderr


@pytest.mark.parametrize('kind', BAD_ARCHIVES)
def test_bad_archive(kind, tmp_path):
    path, spec = tmp_path/'cifar-10-python.tar.gz', BAD_ARCHIVES[kind]
    if isinstance(spec, bytes): path.write_bytes(spec)
    elif callable(spec): path.write_bytes(spec(write_archive(tmp_path/'whole.tar.gz', good).read_bytes()))
    else: write_archive(path, spec)
    result = run_cli('data', '--archive', path, '--data_dir', tmp_path/'data')
    check_one_line_error(result, EXPECTED[kind])
    assert not (tmp_path/'data').exists()


def test_malicious_pickle_runs_nothing(tmp_path):
    marker = tmp_path/'pwned'
    command = f'touch {marker}'.encode()
    payload = b'\x80\x02cos\nsystem\nX' + len(command).to_bytes(4, 'little') + command + b'\x85R.'  # os.system(command)
    write_archive(tmp_path/'evil.tar.gz', {**good, 'test_batch': payload})
    result = run_cli('data', '--archive', tmp_path/'evil.tar.gz', '--data_dir', tmp_path/'data')
    check_one_line_error(result, 'os.system')
    assert not marker.exists()


def test_missing_archive_and_wrong_checksum(tmp_path):
    data = tmp_path/'data'
    check_one_line_error(run_cli('data', '--archive', tmp_path/'nope.tar.gz', '--data_dir', data), 'no such file')
    archive = write_archive(tmp_path/'a.tar.gz', good)
    check_one_line_error(run_cli('data', '--archive', archive, '--sha256', 'ab' * 32, '--data_dir', data), 'sha256 is')
    assert not (tmp_path/'data').exists()


def test_unwritable_data_dir(archive, tmp_path):
    (tmp_path/'file').touch()  # a folder can't be made inside a file, even by root
    result = run_cli('data', '--archive', archive, '--data_dir', tmp_path/'file'/'data')
    check_one_line_error(result, 'cannot write the arrays')


def test_counts_are_checked(tmp_path):
    archive = write_archive(tmp_path/'tiny.tar.gz', good)  # well formed, but 50 images, not 50,000
    check_one_line_error(run_cli('data', '--archive', archive, '--data_dir', tmp_path/'data'), 'expected 50000')


@contextlib.contextmanager
def http_server(folder):
    "A real HTTP server on a free loopback port serving `folder`."
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args): pass
    with http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=folder)) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        yield f'http://127.0.0.1:{server.server_address[1]}'
        server.shutdown()


def test_download_with_wrong_md5_keeps_nothing(tmp_path):
    served, cache = tmp_path/'served', tmp_path/'cache'
    served.mkdir()
    write_archive(served/'cifar-10-python.tar.gz', good)  # not the official file, so its md5 is wrong
    with http_server(served) as url:
        env = cli_env(CIFAR10_CACHE=str(cache), CIFAR10_ARCHIVE='')
        result = run_cli('data', '--url', f'{url}/cifar-10-python.tar.gz', '--data_dir', tmp_path/'data', env=env)
    check_one_line_error(result, 'not the published c58f30108f718f92721af3b95e74349a')
    assert list(cache.iterdir()) == [] and not (tmp_path/'data').exists()


def test_unreachable_download(tmp_path):
    env = cli_env(CIFAR10_CACHE=str(tmp_path/'cache'), CIFAR10_ARCHIVE='')
    url = 'http://127.0.0.1:9/cifar-10-python.tar.gz'  # the discard port: nothing listens there
    result = run_cli('data', '--url', url, '--data_dir', tmp_path/'data', env=env)
    check_one_line_error(result, 'could not download')


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def offline_env(tmp_path: Path) -> dict:
    "No archive anywhere: none named, an empty download cache, downloads sent to a proxy where nothing listens."
    dead = 'http://127.0.0.1:9'
    return cli_env(CIFAR10_ARCHIVE='', CIFAR10_CACHE=str(tmp_path/'empty-cache'), http_proxy=dead, https_proxy=dead,
                   HTTP_PROXY=dead, HTTPS_PROXY=dead, no_proxy='', NO_PROXY='')


def untouched(folder: Path) -> dict:
    "Each file under `folder` with its inode and modification time: equal only if nothing rewrote it."
    return {p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob('*'))}


@pytest.mark.slow
def test_dvc_pipeline_without_the_archive_loses_nothing(archive, tmp_path):
    """A team's pipeline: one checkout builds the data (`make data` runs `dvc repro prepare`), commits dvc.lock and
    pushes to a real local remote; a clone pulls the data. With no archive reachable there, an experiment that changes
    only training settings runs train and evaluate alone; a stage that needs the archive fails in one line; a
    training run that cannot start keeps the model it would have replaced."""
    origin, remote, clone = tmp_path/'origin', tmp_path/'remote', tmp_path/'clone'
    dvc_repo(origin, config_to_yaml(load_config(ROOT/'conf'/'smoke.yaml', {'logging': {'run_name': 'pipeline'}})))
    sh('dvc', 'remote', 'modify', 'storage', 'url', remote, cwd=origin)
    sh('dvc', 'repro', 'prepare', cwd=origin, env=cli_env(CIFAR10_ARCHIVE=str(archive)))
    git_commit(origin, 'the data')
    sh('dvc', 'push', cwd=origin)
    sh('git', 'clone', '-q', origin, clone, cwd=tmp_path)
    sh('dvc', 'pull', 'prepare', cwd=clone)
    splits = ('train', 'test')
    assert {s: digest(clone/'data'/s) for s in splits} == {s: digest(origin/'data'/s) for s in splits}
    data, offline = untouched(clone/'data'), offline_env(tmp_path)

    experiment = sh('dvc', 'exp', 'run', '-S', 'training.max_epochs=1', cwd=clone, env=offline).stdout
    assert "Stage 'prepare' didn't change, skipping" in experiment, experiment
    assert "Running stage 'train'" in experiment and "Running stage 'evaluate'" in experiment
    assert untouched(clone/'data') == data  # not even rewritten
    assert json.loads((clone/'metrics.json').read_text())['images'] == 10_000
    assert 'accuracy' in sh('dvc', 'metrics', 'show', cwd=clone).stdout
    model = (clone/'models'/'pipeline'/'last.ckpt').read_bytes()
    assert torch.load(clone/'models'/'pipeline'/'last.ckpt', weights_only=True)['epoch'] == 0  # one epoch, index 0

    prepare = sh('dvc', 'repro', '--force', 'prepare', cwd=clone, env=offline, ok=False)
    ours = [line for line in prepare.stderr.splitlines() if 'cifar10 data: error:' in line]
    assert prepare.returncode != 0 and len(ours) == 1, prepare.stderr
    assert 'could not download' in ours[0] and 'CIFAR10_ARCHIVE' in ours[0] and 'Traceback' not in prepare.stderr
    assert untouched(clone/'data') == data

    train = sh('dvc', 'exp', 'run', '-S', 'logging.tracking_uri=http://127.0.0.1:9', cwd=clone, env=offline, ok=False)
    assert train.returncode != 0 and 'does not answer' in train.stdout + train.stderr
    assert (clone/'models'/'pipeline'/'last.ckpt').read_bytes() == model
    assert untouched(clone/'data') == data


def test_loader_batches(data_dir):
    images, labels = load_split(data_dir, 'train')
    loader = DeviceLoader(images, labels, batch_size=512, shuffle=True, drop_last=True,
                          augment=Augment(translate=4, flip='random', cutout=8), seed=3)
    first = [b for _, b in zip(range(3), loader)]
    x, y = first[0]
    assert x.shape == (512, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (512,) and y.dtype == torch.int64
    low = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    high = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    per_channel = x.transpose(0, 1).flatten(1)
    assert (per_channel.min(1).values >= low - 1e-5).all() and (per_channel.max(1).values <= high + 1e-5).all()
    assert y.min() >= 0 and y.max() < len(CLASSES)
    assert len(loader) == 50_000 // 512
    second = next(iter(loader))
    assert not torch.equal(second[0], x)  # a new epoch, new shuffle and new augmentations
    again = DeviceLoader(images, labels, batch_size=512, shuffle=True, drop_last=True,
                         augment=Augment(translate=4, flip='random', cutout=8), seed=3)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, again))  # same seed, same batches
    other_seed = DeviceLoader(images, labels, batch_size=512, shuffle=True, drop_last=True, augment=Augment(), seed=4)
    assert not torch.equal(next(iter(other_seed))[0], x)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_loader_half_precision_channels_last(data_dir, dtype):
    images, labels = load_split(data_dir, 'test')
    x, y = next(iter(DeviceLoader(images, labels, batch_size=256, dtype=dtype, channels_last=True)))
    assert x.dtype == dtype and x.is_contiguous(memory_format=torch.channels_last)
    reference, _ = next(iter(DeviceLoader(images, labels, batch_size=256)))
    assert torch.allclose(x.float(), reference, atol=0.02)
