"""The server as a container, built and run with podman: the image from docker/Dockerfile on a base debootstrapped
from this machine's Debian mirror (docker/base-image.sh), an exported model baked in, a picture classified through
the published port, and a prompt stop on SIGTERM."""
import json
import shutil
import subprocess
import time
import urllib.request
import uuid

import pytest
from conftest import ROOT, cli_env, free_port

from cifar10.data import CLASSES

SERVER_IMAGE = 'localhost/cifar10-server:test'
ENGINE_ENV = cli_env(CONTAINERS_CONF=str(ROOT/'docker'/'containers.conf'))  # podman's settings for this machine


def podman(*args, timeout=600, check=True) -> subprocess.CompletedProcess:
    "Run `podman *args` with the project's engine settings (docker/containers.conf) and return the finished process."
    result = subprocess.run(['podman', *map(str, args)], env=ENGINE_ENV, capture_output=True, text=True,
                            timeout=timeout)
    assert not check or result.returncode == 0, f'podman {" ".join(map(str, args))}: {result.stderr[-3000:]}'
    return result


@pytest.fixture(scope='module')
def server_image() -> str:
    "The server image, built by docker/build.sh (cached layers make a rebuild take seconds)."
    if not (shutil.which('podman') and shutil.which('debootstrap')):
        pytest.fail('podman and debootstrap are needed: make test installs them (apt-get install podman runc '
                    'debootstrap)')
    result = subprocess.run([ROOT/'docker'/'build.sh', 'server', SERVER_IMAGE], capture_output=True, text=True,
                            env=ENGINE_ENV, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return SERVER_IMAGE


@pytest.fixture(scope='module')
def model_image(server_image, trained, tmp_path_factory):
    "The server image with the trained run's ONNX export baked in, as the README shows; removed afterwards."
    models, run = trained
    context = tmp_path_factory.mktemp('model-image')
    shutil.copy(models/run/'last.onnx', context/'model.onnx')
    (context/'Containerfile').write_text(f'FROM {server_image}\nCOPY model.onnx /models/model.onnx\n')
    tag = f'localhost/cifar10-server-model:{uuid.uuid4().hex[:8]}'
    podman('build', '--format', 'docker', '-t', tag, context)
    yield tag
    podman('rmi', '--force', tag, check=False)


@pytest.mark.slow
def test_the_server_image_has_no_training_stack_and_no_root(server_image):
    missing = podman('run', '--rm', '--entrypoint', 'python3', server_image, '-c', 'import importlib.util as u; '
                     'print([u.find_spec(m) is None for m in ("torch", "lightning", "mlflow")])')
    assert missing.stdout.strip() == '[True, True, True]', missing.stdout
    user, healthcheck = podman('image', 'inspect', '--format', '{{.User}} {{json .HealthCheck}}', server_image
                               ).stdout.split(' ', 1)
    assert user == 'cifar10' and '/health' in json.loads(healthcheck)['Test'][-1], (user, healthcheck)


def wait_until_serving(url: str, container: str, timeout: float = 180):
    "Return once `url`/health answers; fail with the container's log if it stops first or `timeout` passes."
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f'{url}/health', timeout=2): return
        except OSError:
            running = podman('inspect', '--format', '{{.State.Running}}', container).stdout.strip() == 'true'
            if not running or time.time() > deadline:
                pytest.fail(f'the container did not start serving: {podman("logs", container).stderr[-3000:]}')
            time.sleep(1)


@pytest.mark.slow
def test_the_container_classifies_through_its_published_port_and_stops_on_sigterm(model_image, picture):
    name, port = f'cifar10-test-{uuid.uuid4().hex[:8]}', free_port()
    podman('run', '--detach', '--name', name, '--publish', f'127.0.0.1:{port}:8000', model_image)
    try:
        url = f'http://127.0.0.1:{port}'
        wait_until_serving(url, name)
        request = urllib.request.Request(f'{url}/predict', data=picture(0), headers={'Content-Type': 'image/png'})
        with urllib.request.urlopen(request, timeout=30) as response: answer = json.load(response)
        [prediction] = answer['predictions']
        assert len(prediction['top_k']) == 3 and {o['class'] for o in prediction['top_k']} <= set(CLASSES), answer
        assert podman('exec', name, 'id', '-un').stdout.strip() == 'cifar10'
        podman('healthcheck', 'run', name)
        start = time.monotonic()
        podman('stop', '--time', '30', name)
        stopped_after = time.monotonic() - start
        # 137: still running when the 30 s were up, and killed
        exit_code = int(podman('inspect', '--format', '{{.State.ExitCode}}', name).stdout)
        assert exit_code != 137 and stopped_after < 10, (exit_code, stopped_after, podman('logs', name).stderr[-2000:])
    finally:
        podman('rm', '--force', '--volumes', name, check=False)
