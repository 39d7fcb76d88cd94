"""Inference, export and serving end to end: `cifar10 infer` on a folder of good and bad pictures, ONNX
exports that agree with PyTorch, and `cifar10 serve` answering real HTTP requests, good and bad, reporting
metrics, importing no PyTorch on an ONNX backend, and stopping cleanly."""
import csv
import io
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from conftest import CLI, cifar10_server, cli_env, free_port, run_cli
from PIL import Image

from cifar10.data import CLASSES
from cifar10.serve import wait_until_healthy


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


@pytest.mark.slow
def test_export_agrees_with_pytorch(trained, tiny_data):
    models, run = trained
    checks = export_checks((models.parent/'export.txt').read_text())  # the float32 export the fixture made
    assert checks['onnx'][0] == 1.0 and checks['onnx'][1] < 1e-3, checks  # float32: the same numbers
    assert checks['openvino'][0] >= 0.97, checks  # bf16 where the CPU has it: close
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


def serve_flags(trained, backend='openvino', *more) -> list:
    models, run = trained
    return ['--checkpoint_name', run, '--models_dir', models, '--backend', backend, *more]


@pytest.fixture(scope='module')
def server(trained):
    "The URL of `cifar10 serve` on the trained model's ONNX export, run by OpenVINO."
    log = trained[0].parent/'server.log'
    with cifar10_server(*serve_flags(trained), log=log) as (process, url):
        yield url
        assert process.poll() is None, f'the server died while being tested: {log.read_text()[-3000:]}'


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
    assert [s for s, _ in answers] == [200] * 96
    firsts = [a['predictions'][0]['top_k'][0]['class'] for _, a in answers]
    assert firsts == [single[i % 5]['top_k'][0]['class'] for i in range(96)]


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


def metric(exposition: str, name: str) -> float:
    "The value of the sample `name` (with its labels, as Prometheus writes them) in `exposition`; 0 if absent."
    return next((float(line.rsplit(' ', 1)[1]) for line in exposition.splitlines() if line.startswith(name + ' ')), 0.0)


def test_metrics_count_requests_statuses_batches_and_images(server, picture):
    names = ['cifar10_requests_total{path="/predict",status="200"}',
             'cifar10_requests_total{path="/predict",status="415"}', 'cifar10_images_classified_total',
             'cifar10_batch_size_sum', 'cifar10_request_duration_seconds_count{path="/predict"}']
    before = request(f'{server}/metrics', method='GET')[1]
    for i in range(3): request(f'{server}/predict', picture(i), 'image/png')
    request(f'{server}/predict', *multipart({f'{i}.png': picture(i) for i in range(4)}))
    request(f'{server}/predict', b'{}', 'application/json')
    after = request(f'{server}/metrics', method='GET')[1]
    assert [metric(after, n) - metric(before, n) for n in names] == [4, 1, 7, 7, 5], after


def test_docs_are_served_offline_with_a_schema_for_pictures(server):
    status, schema = request(f'{server}/openapi.json', method='GET')
    body = schema['paths']['/predict']['post']['requestBody']['content']
    assert status == 200 and {'image/png', 'image/jpeg', 'application/octet-stream', 'multipart/form-data'} <= set(body)
    assert body['multipart/form-data']['schema']['properties']['files']['items']['format'] == 'binary'
    status, page = request(f'{server}/docs', method='GET')
    assert status == 200 and '/swagger-ui/swagger-ui-bundle.js' in page and '://' not in page.replace(server, '')
    assert request(f'{server}/swagger-ui/swagger-ui-bundle.js', method='GET')[0] == 200


REPORT_MODULES = '''
import atexit, json, os, sys, threading, time
def report():  # every half second, which of these this process has imported
    path = os.path.join({folder!r}, f'{{os.getpid()}}.json')
    while True:
        # whole or not at all: the test may read it at any moment
        with open(path + '.part', 'w') as f:
            json.dump([m for m in ('torch', 'lightning', 'mlflow', 'cifar10.serve') if m in sys.modules], f)
        os.replace(path + '.part', path)
        time.sleep(0.5)
threading.Thread(target=report, daemon=True).start()
'''


def test_no_server_process_imports_torch_lightning_or_mlflow(trained, tmp_path, picture):
    "Each process of `cifar10 serve --workers 2` (the supervisor and both workers) reports its `sys.modules`."
    (tmp_path/'site').mkdir(); (tmp_path/'modules').mkdir()
    (tmp_path/'site'/'sitecustomize.py').write_text(REPORT_MODULES.format(folder=str(tmp_path/'modules')))
    port = free_port()
    with open(tmp_path/'server.log', 'w') as log:
        process = subprocess.Popen([CLI, 'serve', *serve_flags(trained, 'onnx', '--workers', '2'), '--port', str(port)],
                                   env=cli_env(PYTHONPATH=str(tmp_path/'site')), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        assert wait_until_healthy(f'http://127.0.0.1:{port}/health', 180, process), (tmp_path/'server.log').read_text()
        for i in range(4): assert request(f'http://127.0.0.1:{port}/predict', picture(i), 'image/png')[0] == 200
        servers = [process.pid, *(p.pid for p in psutil.Process(process.pid).children(recursive=True)
                                  if 'python' in p.name() or 'cifar10' in p.name())]
        time.sleep(1.5)  # a report after the requests
        reports = {pid: json.loads((tmp_path/'modules'/f'{pid}.json').read_text()) for pid in servers
                   if (tmp_path/'modules'/f'{pid}.json').exists()}
        assert sum(report == ['cifar10.serve'] for report in reports.values()) >= 3, reports  # supervisor, 2 workers
        assert all(report in (['cifar10.serve'], []) for report in reports.values()), reports
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


@pytest.mark.parametrize('attempt', range(5))
def test_a_stop_is_one_line_and_ends_every_process(trained, tmp_path, attempt):
    "SIGTERM (a service manager) or SIGINT to the process group (Ctrl-C), with one or two workers, five times."
    stop, workers = [signal.SIGTERM, signal.SIGINT][attempt % 2], 1 + (attempt >= 3)
    with cifar10_server(*serve_flags(trained, 'onnx', '--workers', workers), log=tmp_path/'server.log') as (process, _):
        children = psutil.Process(process.pid).children(recursive=True)
        assert len(children) >= workers - 1 + (workers > 1), children  # the workers (and a resource tracker)
        if stop == signal.SIGINT: os.killpg(process.pid, stop)  # what Ctrl-C does: the whole process group
        else: process.send_signal(stop)  # a service manager: the main process alone
        assert process.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
    lines = (tmp_path/'server.log').read_text().splitlines()
    assert lines[0].startswith('serving small (onnx) at http://127.0.0.1:'), lines
    assert lines[1:] == ['cifar10 serve: stopped'], lines


def test_serve_reports_a_port_in_use_or_a_missing_export_in_one_line(trained, tmp_path):
    models, run = trained
    with socket.create_server(('127.0.0.1', 0)) as taken:
        busy = subprocess.run([CLI, 'serve', *serve_flags(trained), '--port', str(taken.getsockname()[1])],
                              env=cli_env(), capture_output=True, text=True, timeout=120)
    (tmp_path/run).mkdir()
    (tmp_path/run/'last.ckpt').write_bytes((models/run/'last.ckpt').read_bytes())  # a run not exported
    missing = subprocess.run([CLI, 'serve', *serve_flags((tmp_path, run), 'onnx'), '--port', str(free_port())],
                             env=cli_env(), capture_output=True, text=True, timeout=120)
    for result, error in ((busy, 'Address already in use'), (missing, 'not exported yet; run cifar10 export')):
        assert result.returncode == 1 and result.stdout == '' and len(result.stderr.splitlines()) == 1, result
        assert result.stderr.startswith('cifar10 serve: error: ') and error in result.stderr, result.stderr
