"""Beyond one process, on what one machine can simulate: data-parallel training with the gloo backend (two
processes through `cifar10 train` and through papermill, two torchrun "nodes" on loopback), hyperparameter
sweeps by two workers sharing one Optuna study on a real PostgreSQL server, and the team's MLflow tracking
server (`make mlflow-postgres`) over PostgreSQL."""
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow
import nbformat
import optuna
import psycopg
import pytest
import torch
import yaml
from conftest import CLI, ROOT, VENV_BIN, cli_env, free_port, run_cli

from cifar10.config import load_config

SMOKE, SWEEP_SMOKE = ROOT/'conf'/'smoke.yaml', ROOT/'conf'/'sweep-smoke.yaml'
STEPS_PER_EPOCH = 1000 // 128  # tiny_data has 1,000 training images; the smoke preset's batch is 128
SMOKE_MODEL = load_config(SMOKE).logging.registered_model


def train_flags(data_dir, models, uri, name, **settings) -> list[str]:
    "Flags of a smoke run called `name` on `data_dir` (the whole tiny split), plus `settings` as section__key=value."
    flags = ['--config', SMOKE, '--data.data_dir', data_dir, '--data.subset', 'null', '--training.models_dir', models,
             '--logging.tracking_uri', uri, '--logging.run_name', name]
    for key, value in settings.items(): flags += [f'--{key.replace("__", ".")}', value]
    return list(map(str, flags))


def check_one_run(uri: str, name: str, models: Path, data_dir: Path, epochs: int, killed: bool = False) -> dict:
    """What every data-parallel run must leave: one MLflow run and one registered version, the planned number of
    optimizer steps, and logged test metrics that `cifar10 infer` measures again on the saved checkpoint."""
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name('cifar10')
    [run] = client.search_runs([experiment.experiment_id])  # one run, however many processes trained it
    assert run.info.run_name == name and run.data.params['data.batch_size'] == '128'
    total = epochs * STEPS_PER_EPOCH  # a global batch of 128 a step, whatever the processes
    assert torch.load(models/name/'last.ckpt', weights_only=True)['global_step'] == total
    steps = {m.step for m in client.get_metric_history(run.info.run_id, 'train/loss')}
    assert max(steps) == total - 1  # a killed run loses the step metrics MLflow had not yet sent (its last 2 s)
    assert len(steps) == total or killed and len(steps) > total - STEPS_PER_EPOCH
    [version] = client.search_model_versions(f"name = '{SMOKE_MODEL}'")
    assert version.run_id == run.info.run_id
    result = run_cli('infer', '--checkpoint_name', name, '--models_dir', models, '--data_dir', data_dir,
                     '--output', models/'infer.json')
    assert result.returncode == 0, result.stderr[-3000:]
    measured, logged = json.loads((models/'infer.json').read_text()), run.data.metrics
    assert measured['images'] == 500  # all of them: the logged metrics match only if the ranks' pieces cover each once
    assert measured['accuracy'] == pytest.approx(logged['test/acc'], abs=1e-4)
    assert measured['cross_entropy'] == pytest.approx(logged['test/loss'], abs=1e-4)
    return run.data.params


@pytest.mark.slow
def test_two_processes_through_the_cli_killed_and_resumed(tiny_data, tmp_path):
    "`--training.devices 2`: `fit` starts the processes; a run killed with all of them continues with `--resume`."
    models, uri = tmp_path/'models', f'sqlite:///{tmp_path}/mlflow.db'
    flags = train_flags(tiny_data, models, uri, 'ddp', training__devices=2, training__max_epochs=6)
    process = subprocess.Popen([CLI, 'train', *flags], cwd=tmp_path, env=cli_env(), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last, deadline = models/'ddp'/'last.ckpt', time.time() + 300
    while not last.exists() and process.poll() is None and time.time() < deadline: time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL); process.wait()  # the launcher and both ranks
    assert torch.load(last, weights_only=True)['epoch'] < 5, 'the run finished before it could be killed'
    resumed = run_cli('train', '--resume', models/'ddp', cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count('run ddp: test accuracy') == 1  # rank 0 reports; rank 1 says nothing
    params = check_one_run(uri, 'ddp', models, tiny_data, epochs=6, killed=True)
    assert params['training.devices'] == '2'


@pytest.mark.slow
def test_two_processes_through_papermill(tiny_data, tmp_path):
    models, uri = tmp_path/'models', f'sqlite:///{tmp_path}/mlflow.db'
    overrides = {'data': {'data_dir': str(tiny_data), 'subset': None},
                 'training': {'models_dir': str(models), 'devices': 2},
                 'logging': {'tracking_uri': uri, 'run_name': 'notebook-ddp'}}
    out = tmp_path/'executed.ipynb'
    result = subprocess.run(['papermill', ROOT/'nbs'/'train.ipynb', out, '-p', 'config_file', SMOKE,
                             '-y', yaml.safe_dump(overrides), '--log-level', 'WARNING'],
                            cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = ''.join(o.get('text', '') for c in nbformat.read(out, as_version=4).cells for o in c.get('outputs', []))
    assert 'run notebook-ddp: test accuracy' in outputs
    check_one_run(uri, 'notebook-ddp', models, tiny_data, epochs=2)


@pytest.mark.slow
def test_two_nodes_on_loopback_with_torchrun(tiny_data, tmp_path):
    "Each 'node' is a `torchrun --nnodes 2 --node_rank i` of `cifar10 train`, as on two machines of a cluster."
    models, uri, port = tmp_path/'models', f'sqlite:///{tmp_path}/mlflow.db', free_port()
    flags = train_flags(tiny_data, models, uri, 'two-nodes', training__num_nodes=2)
    nodes = [subprocess.Popen([VENV_BIN/'torchrun', '--nnodes', '2', '--nproc_per_node', '1', '--node_rank', str(i),
                               '--master_addr', '127.0.0.1', '--master_port', str(port), CLI, 'train', *flags],
                              cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try: (first, first_errors), (second, second_errors) = (node.communicate(timeout=600) for node in nodes)
    finally:
        for node in nodes: node.kill()
    assert [node.returncode for node in nodes] == [0, 0], first_errors[-3000:] + second_errors[-3000:]
    assert first.count('run two-nodes: test accuracy') == 1 and 'test accuracy' not in second  # rank 0 reports
    params = check_one_run(uri, 'two-nodes', models, tiny_data, epochs=2)
    assert params['training.num_nodes'] == '2'


@pytest.mark.parametrize('flags, message', [
    (['--data.batch_size', '100', '--training.devices', '3'], 'data.batch_size: 100 does not divide among the 3'),
    (['--training.num_nodes', '2'], 'start the run on every machine with torchrun or srun'),
])
def test_data_parallel_settings_that_cannot_work_are_one_line(flags, message, tiny_data, tmp_path):
    result = run_cli('train', '--config', SMOKE, '--data.data_dir', tiny_data, *flags, cwd=tmp_path)
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith('cifar10 train: error:') and message in result.stderr
    assert list(tmp_path.iterdir()) == []  # no models/, no mlflow.db


def postgres_programs() -> Path:
    "The folder of PostgreSQL's server programs from Debian's package (make test installs it)."
    found = sorted(Path('/usr/lib/postgresql').glob('*/bin/postgres'))
    if not found: pytest.fail("no PostgreSQL server in /usr/lib/postgresql: install Debian's postgresql (make test)")
    return found[-1].parent


@pytest.fixture(scope='module')
def postgres():
    "A real PostgreSQL server in a throwaway cluster on a free loopback port; yields its URL (no database named)."
    programs, folder, port = postgres_programs(), Path(tempfile.mkdtemp(prefix='cifar10-postgres-')), free_port()
    as_owner = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: as the postgres user that Debian's package made
        shutil.chown(folder, 'postgres'); as_owner = ['runuser', '-u', 'postgres', '--']
    subprocess.run([*as_owner, programs/'initdb', '-D', folder/'data', '-U', 'postgres', '-A', 'trust', '-E', 'UTF8',
                    '--no-sync'], check=True, capture_output=True, timeout=120)
    with open(folder/'server.log', 'w') as log:
        server = subprocess.Popen([*as_owner, programs/'postgres', '-D', folder/'data', '-p', str(port), '-k', folder,
                                   '-c', 'listen_addresses=127.0.0.1', '-c', 'fsync=off'],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 60
        while subprocess.run([programs/'pg_isready', '-q', '-h', '127.0.0.1', '-p', str(port)]).returncode != 0:
            if server.poll() is not None or time.time() > deadline:
                pytest.fail(f'PostgreSQL did not start: {(folder/"server.log").read_text()[-2000:]}')
            time.sleep(0.2)
        yield f'postgresql://postgres@127.0.0.1:{port}'  # libpq's form; SQLAlchemy's adds +psycopg
    finally:
        os.killpg(server.pid, signal.SIGINT)  # PostgreSQL's fast shutdown
        server.wait(timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def create_database(server: str, name: str) -> str:
    "Create database `name` on the PostgreSQL `server`; its URL for SQLAlchemy (Optuna, MLflow), driver psycopg 3."
    with psycopg.connect(f'{server}/postgres', autocommit=True) as connection:  # CREATE DATABASE: no transaction
        connection.execute(f'CREATE DATABASE "{name}"')
    return f'{server}/{name}'.replace('postgresql://', 'postgresql+psycopg://')


@pytest.fixture(scope='module')
def team_server(postgres, tmp_path_factory):
    "`make mlflow-postgres`: MLflow over a PostgreSQL database, serving the artifacts; yields its URL and store."
    folder, port = tmp_path_factory.mktemp('team-server'), free_port()
    database, venv = create_database(postgres, 'mlflow'), VENV_BIN.parent
    command = ['make', '--no-print-directory', f'VENV={venv}', '-o', f'{venv}/.installed', 'mlflow-postgres',
               f'DATABASE={database}', f'PORT={port}', f'ARTIFACTS={folder}/artifacts', 'WORKERS=1']
    with open(folder/'server.log', 'w') as log:
        server = subprocess.Popen(command, cwd=ROOT, env=cli_env(), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    url = f'http://127.0.0.1:{port}'
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f'{url}/health', timeout=2): break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f'make mlflow-postgres did not start: {(folder/"server.log").read_text()[-3000:]}')
                time.sleep(0.5)
        yield SimpleNamespace(url=url, database=database, artifacts=folder/'artifacts')
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


@pytest.mark.slow
def test_the_team_tracking_server_keeps_runs_and_models_in_postgres(tiny_data, team_server, tmp_path):
    flags = train_flags(tiny_data, tmp_path/'models', team_server.url, 'team-run',
                        logging__experiment='team', logging__registered_model='team-model')
    result = run_cli('train', *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow.MlflowClient(team_server.url)  # everything read back through the server
    [run] = client.search_runs([client.get_experiment_by_name('team').experiment_id])
    assert run.info.run_name == 'team-run' and 'test/acc' in run.data.metrics
    assert client.get_registered_model('team-model').name == 'team-model'
    [version] = client.search_model_versions("name = 'team-model'")
    assert version.run_id == run.info.run_id
    with psycopg.connect(team_server.database.replace('+psycopg', '')) as connection:  # it is in PostgreSQL
        rows = connection.execute('SELECT name FROM runs WHERE run_uuid = %s', (run.info.run_id,)).fetchall()
    assert rows == [('team-run',)]
    assert list(team_server.artifacts.rglob('weights.pt'))  # the server stored the uploaded artifacts
    source = client.get_model_version_download_uri('team-model', version.version)
    assert source.startswith('mlflow-artifacts:')  # the server serves the artifacts: clients need no other store
    folder = Path(mlflow.artifacts.download_artifacts(source, dst_path=str(tmp_path/'download'),
                                                      tracking_uri=team_server.url))
    assert (folder/'MLmodel').is_file() and torch.load(folder/'extra_files'/'weights.pt', weights_only=True)


@pytest.mark.slow
def test_two_sweep_workers_share_one_study_in_postgres(tiny_data, postgres, team_server, tmp_path):
    storage = create_database(postgres, 'optuna')
    flags = ['--config', SMOKE, '--config', SWEEP_SMOKE, '--data.data_dir', tiny_data, '--data.subset', 'null',
             '--training.models_dir', tmp_path/'models', '--logging.tracking_uri', team_server.url,
             '--logging.experiment', 'sweeps', '--sweep.storage', storage, '--sweep.study', 'shared',
             '--sweep.output', tmp_path/'best.yaml']
    workers = [subprocess.Popen([CLI, 'sweep', *map(str, flags)], cwd=tmp_path, env=cli_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try: outputs = [worker.communicate(timeout=600) for worker in workers]
    finally:
        for worker in workers: worker.kill()
    assert [w.returncode for w in workers] == [0, 0], '\n'.join(err[-3000:] for _, err in outputs)
    assert all('this worker ran 2 trials' in out for out, _ in outputs)

    trials = optuna.load_study(study_name='shared', storage=storage).trials
    states = {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert len(trials) == 4 and {t.state for t in trials} <= states, [t.state for t in trials]
    assert len({t.number for t in trials}) == 4 and len({tuple(sorted(t.params.items())) for t in trials}) == 4
    client = mlflow.MlflowClient(team_server.url)
    experiment = client.get_experiment_by_name('sweeps').experiment_id
    [parent] = client.search_runs([experiment], "attributes.run_name = 'shared'")  # one parent for both workers
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == [f'shared-{t.number}' for t in trials]
    assert {r.info.run_name: r.data.tags['optuna.state'] for r in children} == \
        {f'shared-{t.number}': t.state.name for t in trials}
    finished = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert finished, 'every trial was pruned'
    best = max(finished, key=lambda t: t.value)  # the objective: validation accuracy, to maximize
    preset = load_config(tmp_path/'best.yaml')  # what `cifar10 train --config` reads
    assert preset.training.lr == best.params['training.lr'] and preset.logging.run_name is None
    runs = {r.info.run_name: r for r in children}
    assert runs[f'shared-{best.number}'].data.metrics['val/acc'] == pytest.approx(best.value)  # never the test split


def test_a_sweep_without_held_out_images_is_refused(tiny_data, tmp_path):
    "Trials judged on the test split would let it choose the model: refused, before any study or run exists."
    result = run_cli('sweep', '--config', SMOKE, '--config', SWEEP_SMOKE, '--data.data_dir', tiny_data,
                     '--data.val_size', '0', cwd=tmp_path)
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    assert 'data.val_size is 0' in result.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []  # no optuna.db, no mlflow.db, no preset
