"""Inference, export and serving end to end: `cifar10 infer` on a folder of good and bad pictures, ONNX
exports that agree with PyTorch, and `cifar10 serve` answering real HTTP requests, good and bad."""
import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import CLI, ROOT, cli_env, free_port, run_cli
from PIL import Image

from cifar10.data import CLASSES, load_split


@pytest.fixture(scope='session')
def trained(tiny_data, tmp_path_factory):
    "A run of the smoke preset on the tiny data: (models folder, run name)."
    folder = tmp_path_factory.mktemp('trained')
    result = run_cli('train', '--config', ROOT/'conf'/'smoke.yaml', '--data.data_dir', tiny_data,
                     '--data.subset', 'null', '--training.models_dir', folder/'models',
                     '--logging.tracking_uri', f'sqlite:///{folder}/mlflow.db', '--logging.run_name', 'small',
                     cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder/'models', 'small'


@pytest.fixture(scope='session')
def picture(data_dir):
    "A function of `index`, `size`, `format`, `mode`: that test image of the real data, resized, as a file's bytes."
    images, _ = load_split(data_dir, 'test')
    def encode(index: int, size=(32, 32), format='PNG', mode='RGB') -> bytes:
        image = Image.fromarray(np.array(images[index]).transpose(1, 2, 0)).resize(size).convert(mode)
        buffer = io.BytesIO(); image.save(buffer, format); return buffer.getvalue()
    return encode


def test_infer_a_folder_of_good_and_bad_pictures(trained, tmp_path, picture):
    models, run = trained
    pictures = tmp_path/'pictures'
    (pictures/'nested').mkdir(parents=True)
    (pictures/'cat.png').write_bytes(picture(0))
    (pictures/'ship.jpg').write_bytes(picture(1, (320, 240), 'JPEG'))
    (pictures/'nested'/'grey.bmp').write_bytes(picture(2, (64, 64), 'BMP', 'L'))
    (pictures/'nested'/'alpha.webp').write_bytes(picture(3, (50, 50), 'WEBP', 'RGBA'))
    (pictures/'broken.png').write_bytes(picture(4, (200, 200))[:400])  # truncated
    (pictures/'fake.jpg').write_text('not a picture at all')
    (pictures/'notes.txt').write_text('not an image suffix: not read')
    result = run_cli('infer', '--checkpoint_name', run, '--models_dir', models, pictures,
                     '--output', tmp_path/'out.csv')
    assert result.returncode == 1 and '2 of 6 inputs could not be classified' in result.stderr, result.stderr
    rows = {Path(r['path']).name: r for r in csv.DictReader(open(tmp_path/'out.csv'))}
    assert set(rows) == {'cat.png', 'ship.jpg', 'grey.bmp', 'alpha.webp', 'broken.png', 'fake.jpg'}
    for name in ('cat.png', 'ship.jpg', 'grey.bmp', 'alpha.webp'):
        assert rows[name]['label'] in CLASSES and not rows[name]['error'] and len(rows[name]['top_k'].split()) == 3
    assert 'image file is truncated' in rows['broken.png']['error'] and 'not an image' in rows['fake.jpg']['error']
    good = run_cli('infer', '--checkpoint_name', run, '--models_dir', models, pictures/'cat.png', '--top_k', '5',
                   '--output', tmp_path/'out.json')
    assert good.returncode == 0, good.stderr
    [record] = json.loads((tmp_path/'out.json').read_text())
    probabilities = [o['probability'] for o in record['top_k']]
    assert len(probabilities) == 5 and len({o['class'] for o in record['top_k']}) == 5
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6, record
    assert record['label'] == record['top_k'][0]['class'] and record['probability'] == probabilities[0]


def export_checks(output: str) -> dict:
    "{backend: (top-1 agreement, max logit difference)} from `cifar10 export`'s report."
    checks = {}
    for line in output.splitlines():
        if line.startswith('--backend'):
            agreement = float(line.split('agreement with PyTorch ')[1].split('%')[0]) / 100
            checks[line.split()[1].rstrip(',')] = agreement, float(line.split('max logit difference ')[1].split(',')[0])
    return checks


def test_export_agrees_with_pytorch(trained, tiny_data):
    models, run = trained
    exported = run_cli('export', '--checkpoint_name', run, '--models_dir', models, '--data_dir', tiny_data)
    assert exported.returncode == 0, exported.stderr
    checks = export_checks(exported.stdout)
    assert checks['onnx'][0] == 1.0 and checks['onnx'][1] < 1e-3, exported.stdout  # float32: the same numbers
    assert checks['openvino'][0] >= 0.97, exported.stdout  # bf16 where the CPU has it: close
    quantized = run_cli('export', '--checkpoint_name', run, '--models_dir', models, '--format', 'onnx-int8',
                        '--data_dir', tiny_data)
    assert quantized.returncode == 0, quantized.stderr
    # a barely trained model's logits are nearly tied, so top-1 agreement says little here; the logits stay close
    assert export_checks(quantized.stdout)['onnx-int8'][1] < 0.5, quantized.stdout
    accuracies = {}
    for backend in ('torch', 'onnx', 'openvino', 'onnx-int8'):
        result = run_cli('infer', '--checkpoint_name', run, '--models_dir', models, '--data_dir', tiny_data,
                         '--backend', backend)
        assert result.returncode == 0, result.stderr
        accuracies[backend] = float(result.stdout.split('accuracy ')[1].split(',')[0])
    assert accuracies['onnx'] == accuracies['torch']
    assert all(abs(accuracies[b] - accuracies['torch']) < 0.03 for b in ('openvino', 'onnx-int8')), accuracies


def test_a_stale_export_is_refused(trained, tiny_data, tmp_path):
    models, run = trained
    exported = run_cli('export', '--checkpoint_name', run, '--models_dir', models, '--data_dir', tiny_data)
    assert exported.returncode == 0, exported.stderr
    copy = tmp_path/'models'/run
    copy.mkdir(parents=True)
    for name in ('last.ckpt', 'last.onnx'): (copy/name).write_bytes((models/run/name).read_bytes())
    fresh = run_cli('infer', '--checkpoint_name', run, '--models_dir', copy.parent, '--data_dir', tiny_data,
                    '--backend', 'onnx')
    assert fresh.returncode == 0, fresh.stderr
    with open(copy/'last.ckpt', 'ab') as f: f.write(b'retrained')  # the checkpoint changes after the export
    stale = run_cli('infer', '--checkpoint_name', run, '--models_dir', copy.parent, '--data_dir', tiny_data,
                    '--backend', 'onnx')
    assert stale.returncode == 1 and 'exported from an earlier version' in stale.stderr, stale.stderr
    assert 'run cifar10 export' in stale.stderr and 'Traceback' not in stale.stderr


def request(url, body=None, content_type=None, method='POST'):
    "Status and JSON (or text) of an HTTP request."
    headers = {'Content-Type': content_type} if content_type else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers, method=method), timeout=60) as r:
            status, data = r.status, r.read()
    except urllib.error.HTTPError as e: status, data = e.code, e.read()
    try: return status, json.loads(data)
    except ValueError: return status, data.decode()


def multipart(files: dict) -> tuple[bytes, str]:
    parts = []
    for name, data in files.items():
        parts += [b'--XyZ', f'Content-Disposition: form-data; name="image"; filename="{name}"'.encode(),
                  b'Content-Type: application/octet-stream', b'', data]
    return b'\r\n'.join(parts + [b'--XyZ--', b'']), 'multipart/form-data; boundary=XyZ'


@contextlib.contextmanager
def serving(models, run, log):
    "`cifar10 serve` on a run, in its own process group on a free loopback port, output to `log`: (process, URL)."
    port = free_port()
    command = [CLI, 'serve', '--checkpoint_name', run, '--models_dir', str(models), '--port', str(port)]
    with open(log, 'w') as output:  # a file, not a pipe: a server that writes a lot can't block on it
        process = subprocess.Popen(command, env=cli_env(), stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # its own process group, to be sure to stop it all
    url = f'http://127.0.0.1:{port}'
    try:
        deadline = time.time() + 120
        while not healthy(url):
            if process.poll() is not None or time.time() > deadline:
                pytest.fail(f'server did not start: {log.read_text()[-3000:]}')
            time.sleep(0.2)
        yield process, url
    finally:
        with contextlib.suppress(ProcessLookupError): os.killpg(process.pid, signal.SIGKILL)  # whatever is left
        process.wait(timeout=30)


@pytest.fixture(scope='module')
def server(trained):
    "The URL of `cifar10 serve` on the trained model."
    models, run = trained
    log = models.parent/'server.log'
    with serving(models, run, log) as (process, url):
        yield url
        assert process.poll() is None, f'the server died while being tested: {log.read_text()[-3000:]}'


def test_sigterm_stops_every_server_process(trained, tmp_path):
    "A service manager stops `cifar10 serve` with SIGTERM to its main process: the HTTP and model processes go too."
    with serving(*trained, tmp_path/'server.log') as (process, url):
        children = psutil.Process(process.pid).children(recursive=True)
        assert children, 'expected LitServe to run HTTP and model processes'
        process.terminate()
        process.wait(timeout=60)
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [p.cmdline() for p in alive]


def healthy(url) -> bool:
    try:
        with urllib.request.urlopen(f'{url}/health', timeout=1) as response: return response.status == 200
    except OSError: return False


def test_server_classifies_single_batched_and_concurrent_requests(server, picture):
    status, answer = request(f'{server}/predict', picture(0), 'image/png')
    assert status == 200 and answer['predictions'][0]['top_k'][0]['class'] in CLASSES, answer
    status, answer = request(f'{server}/predict', picture(5, (800, 600), 'JPEG'), 'image/jpeg')
    assert status == 200
    body, content_type = multipart({f'{i}.png': picture(i) for i in range(5)})
    status, answer = request(f'{server}/predict', body, content_type)
    assert status == 200 and [p['name'] for p in answer['predictions']] == [f'{i}.png' for i in range(5)]
    single = [request(f'{server}/predict', picture(i), 'image/png')[1]['predictions'][0] for i in range(5)]
    assert [s['top_k'][0]['class'] for s in single] == [p['top_k'][0]['class'] for p in answer['predictions']]
    with ThreadPoolExecutor(32) as pool:  # arrive together, get batched, each gets its own answer back
        answers = list(pool.map(lambda i: request(f'{server}/predict', picture(i % 5), 'image/png'), range(96)))
    assert all(s == 200 for s, _ in answers)
    firsts = [a['predictions'][0]['top_k'][0]['class'] for _, a in answers[:5]]
    assert firsts == [s['top_k'][0]['class'] for s in single]


BAD_REQUESTS = {
    'empty body': (b'', 'image/png', 400),
    'not an image': (b'GIF89a but not really', 'image/gif', 400),
    'truncated image': (None, 'image/png', 400),
    'decompression bomb': (None, 'image/png', 413),
    'body over the size limit': (b'\0' * (16 * 2**20 + 1), 'application/octet-stream', 413),
    'wrong content type': (b'{"image": "cat"}', 'application/json', 415),
    'no content type': (b'\x89PNG', None, 415),
    'form without files': (b'--XyZ\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--XyZ--\r\n',
                           'multipart/form-data; boundary=XyZ', 400),
}


@pytest.mark.parametrize('case', BAD_REQUESTS)
def test_server_rejects_bad_requests_and_keeps_serving(server, case, picture):
    body, content_type, expected = BAD_REQUESTS[case]
    if case == 'truncated image': body = picture(0, (300, 300))[:500]
    if case == 'decompression bomb':
        buffer = io.BytesIO(); Image.new('1', (9000, 9000)).save(buffer, 'PNG'); body = buffer.getvalue()
    status, answer = request(f'{server}/predict', body, content_type)
    assert status == expected and isinstance(answer, dict) and answer.get('detail'), (status, answer)
    assert request(f'{server}/predict', picture(0), 'image/png')[0] == 200  # still serving


def test_server_listens_on_loopback_only(server):
    port = int(server.rsplit(':', 1)[1])
    listening = [c.laddr.ip for c in psutil.net_connections('tcp') if c.status == 'LISTEN' and c.laddr.port == port]
    assert listening and set(listening) == {'127.0.0.1'}, listening
