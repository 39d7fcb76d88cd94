"""Training end to end on tiny data: the CLI against a real MLflow server, papermill, the DVC pipeline,
resuming a killed run, seeding, and bad configurations refused before any work starts."""
import json
import os
import signal
import subprocess
import time

import mlflow
import nbformat
import pytest
import torch
import yaml
from conftest import CLI, ROOT, cli_env, run_cli

from cifar10.config import config_to_yaml, load_config
from cifar10.trainer import fit

SMOKE = ROOT/'conf'/'smoke.yaml'


def smoke_flags(data_dir, **settings) -> list[str]:
    "Flags for a smoke run on `data_dir` (whole splits: they are tiny), plus `settings` as section.key=value."
    flags = ['--config', SMOKE, '--data.data_dir', data_dir, '--data.subset', 'null']
    for key, value in settings.items(): flags += [f'--{key.replace("__", ".")}', value]
    return flags


def test_cli_train_tracks_everything_on_a_server(tiny_data, mlflow_server, tmp_path):
    result = run_cli('train', *smoke_flags(tiny_data, training__models_dir=tmp_path/'models',
                                           logging__tracking_uri=mlflow_server, logging__run_name='cli-run',
                                           logging__registered_model='cli-model'), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'run cli-run: test accuracy' in result.stdout and 'version 1' in result.stdout
    client = mlflow.MlflowClient(mlflow_server)
    [run] = client.search_runs(client.get_experiment_by_name('cifar10').experiment_id,
                               "attributes.run_name = 'cli-run'")
    params, metrics = run.data.params, run.data.metrics
    assert params['training.max_epochs'] == '2' and params['model.arch'] == 'fastnet' and len(params) == 29
    steps_per_epoch = 1000 // 128
    assert len(client.get_metric_history(run.info.run_id, 'train/loss')) == 2 * steps_per_epoch  # every step
    assert len(client.get_metric_history(run.info.run_id, 'lr-SGD/weights')) == 2 * steps_per_epoch
    assert len(client.get_metric_history(run.info.run_id, 'val/acc')) == 2  # every epoch
    assert {'test/acc', 'test/loss', 'test/acc/cat'} <= metrics.keys() and 0 <= metrics['test/acc'] <= 1
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    artifacts |= {a.path for a in client.list_artifacts(run.info.run_id, 'checkpoints')}
    assert {'confusion_matrix.png', 'checkpoints/best.ckpt', 'checkpoints/last.ckpt'} <= artifacts
    [version] = client.search_model_versions("name = 'cli-model'")
    assert version.run_id == run.info.run_id

    # inference needs nothing but the registered model, and agrees with what training logged
    registered = run_cli('infer', '--checkpoint_name', 'models:/cli-model/1', '--data_dir', tiny_data,
                         '--output', tmp_path/'metrics.json', cwd=tmp_path,
                         env=cli_env(MLFLOW_TRACKING_URI=mlflow_server))
    assert registered.returncode == 0, registered.stderr
    evaluated = json.loads((tmp_path/'metrics.json').read_text())
    assert evaluated['accuracy'] == pytest.approx(metrics['test/acc'], abs=1e-4)
    assert evaluated['cross_entropy'] == pytest.approx(metrics['test/loss'], abs=1e-4)
    local = run_cli('infer', '--checkpoint_name', 'cli-run', '--models_dir', tmp_path/'models', '--data_dir', tiny_data)
    assert local.returncode == 0 and f'accuracy {metrics["test/acc"]:.4f}' in local.stdout, local.stdout + local.stderr


def test_papermill_runs_the_training_notebook(tiny_data, tmp_path):
    out = tmp_path/'executed.ipynb'
    overrides = {'data': {'data_dir': str(tiny_data), 'subset': None},
                 'training': {'models_dir': str(tmp_path/'models')},
                 'logging': {'tracking_uri': f'sqlite:///{tmp_path}/mlflow.db', 'run_name': 'notebook-run'}}
    result = subprocess.run(['papermill', ROOT/'nbs'/'train.ipynb', out, '-p', 'config_file', SMOKE,
                             '-y', yaml.safe_dump(overrides), '--inject-output-path', '--log-level', 'WARNING'],
                            cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = ''.join(o.get('text', '') for c in nbformat.read(out, as_version=4).cells for o in c.get('outputs', []))
    assert 'run notebook-run: test accuracy' in outputs
    client = mlflow.MlflowClient(f'sqlite:///{tmp_path}/mlflow.db')
    [run] = client.search_runs(client.get_experiment_by_name('cifar10').experiment_id)
    assert run.data.params['data.subset'] == 'None' and run.data.params['training.max_epochs'] == '2'
    assert [a.path for a in client.list_artifacts(run.info.run_id, 'notebook')] == ['notebook/executed.ipynb']


def test_dvc_pipeline_repro_experiment_and_metrics(archive, tmp_path):
    repo = tmp_path/'repo'
    repo.mkdir()
    for name in ('dvc.yaml', '.dvcignore', 'settings.ini'): (repo/name).write_bytes((ROOT/name).read_bytes())
    subprocess.run(['cp', '-r', ROOT/'.dvc', ROOT/'cifar10', ROOT/'conf', repo], check=True)
    for folder in ('nbs', 'models'): (repo/folder).mkdir()
    (repo/'nbs'/'train.ipynb').write_bytes((ROOT/'nbs'/'train.ipynb').read_bytes())
    for junk in ('cache', 'tmp', 'config.local'): subprocess.run(['rm', '-rf', repo/'.dvc'/junk])
    params = load_config(SMOKE, {'logging': {'run_name': 'pipeline'}})  # the smoke preset as DVC params
    (repo/'params.yaml').write_text(config_to_yaml(params))
    env = cli_env(CIFAR10_ARCHIVE=str(archive))
    def sh(*cmd):
        result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f'{cmd}: {result.stdout[-3000:]}\n{result.stderr[-3000:]}'
        return result.stdout
    sh('git', 'init', '-q'); sh('git', 'add', '-A')
    sh('git', '-c', 'user.name=test', '-c', 'user.email=test@example.com', 'commit', '-qm', 'the pipeline')
    sh('dvc', 'repro')
    metrics = json.loads((repo/'metrics.json').read_text())
    assert metrics['images'] == 10_000 and 0 <= metrics['accuracy'] <= 1
    assert 'accuracy' in sh('dvc', 'metrics', 'show')
    assert (repo/'models'/'pipeline'/'last.ckpt').is_file() and (repo/'models'/'pipeline.ipynb').is_file()
    sh('dvc', 'exp', 'run', '-S', 'training.max_epochs=1')
    assert yaml.safe_load((repo/'params.yaml').read_text())['training']['max_epochs'] == 1
    assert torch.load(repo/'models'/'pipeline'/'last.ckpt', weights_only=True)['epoch'] == 0  # one epoch: index 0


def test_resume_after_the_process_is_killed(tiny_data, tmp_path):
    "A run killed mid-way continues from its last checkpoint, in the same MLflow run, to the planned end."
    flags = smoke_flags(tiny_data, training__max_epochs='8', logging__run_name='killed')
    process = subprocess.Popen([CLI, 'train', *map(str, flags)], cwd=tmp_path, env=cli_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path/'models'/'killed'/'last.ckpt'
    deadline = time.time() + 300
    while not last.exists() and process.poll() is None and time.time() < deadline: time.sleep(0.05)
    process.send_signal(signal.SIGKILL); process.wait()
    killed_at = torch.load(last, weights_only=True)['epoch']  # the checkpoint is whole, though the process died
    assert killed_at < 7, 'the run finished before it could be killed; make it longer'
    result = run_cli('train', '--resume', tmp_path/'models'/'killed', cwd=tmp_path)  # by folder: where it is now
    assert result.returncode == 0, result.stderr
    final = torch.load(last, weights_only=True)
    assert final['epoch'] == 7 and final['global_step'] == 8 * (1000 // 128)
    run_id = yaml.safe_load((tmp_path/'models'/'killed'/'run.yaml').read_text())['run_id']
    client = mlflow.MlflowClient(f'sqlite:///{tmp_path}/mlflow.db')
    epochs = {m.step for m in client.get_metric_history(run_id, 'val/acc')}
    assert len(epochs) == 8 and 'test/acc' in client.get_run(run_id).data.metrics  # one run, all epochs


def test_same_seed_same_metrics(tiny_data, tmp_path):
    def run(name, seed):
        cfg = load_config(SMOKE, {'data': {'data_dir': str(tiny_data), 'subset': None},
                                  'training': {'seed': seed, 'models_dir': str(tmp_path/'models')},
                                  'logging': {'tracking_uri': f'sqlite:///{tmp_path}/mlflow.db', 'run_name': name}})
        return fit(cfg).test_metrics
    tracking_before = os.environ.get('MLFLOW_TRACKING_URI')
    first = run('a', seed=1)
    assert run('b', seed=1) == first
    assert run('c', seed=2) != first
    assert os.environ.get('MLFLOW_TRACKING_URI') == tracking_before  # not left for later subprocesses to inherit


BAD_SETTINGS = {  # flags, the key the error must name, the exit code (2: the parser's, 1: a later check's)
    'unknown key': (['--training.epochs', '3'], 'training.epochs', 2),
    'wrong type': (['--training.max_epochs', 'three'], 'training.max_epochs', 2),
    'out of range': (['--training.lr', '-1'], 'training.lr', 2),
    'unknown architecture': (['--model.arch', 'resnet50'], 'model.arch', 2),
    'unknown accelerator': (['--training.accelerator', 'gpus'], 'training.accelerator', 2),
    'warm-up past the end': (['--training.max_epochs', '2', '--training.warmup_epochs', '3'], 'warmup_epochs', 1),
    'run name with a path': (['--logging.run_name', '../outside'], 'logging.run_name', 1),
}


@pytest.mark.parametrize('case', BAD_SETTINGS)
def test_bad_flags_are_refused_before_any_work(case, tmp_path):
    flags, key, code = BAD_SETTINGS[case]
    result = run_cli('train', *flags, cwd=tmp_path)
    assert result.returncode == code and key in result.stderr and 'Traceback' not in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []  # no models/, no mlflow.db


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without a GPU')
def test_a_missing_gpu_is_reported_before_the_run_starts(tiny_data, tmp_path):
    result = run_cli('train', *smoke_flags(tiny_data, training__accelerator='gpu'), cwd=tmp_path)
    assert result.returncode == 1 and 'training.accelerator gpu' in result.stderr, result.stderr
    assert 'Traceback' not in result.stderr and not (tmp_path/'models').exists()


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(tiny_data, tmp_path):
    flags = smoke_flags(tiny_data, data__val_size='1000', logging__run_name='doomed')  # all 1000 images held out
    result = run_cli('train', *flags, cwd=tmp_path)
    assert result.returncode == 1 and 'leaves no training images' in result.stderr, result.stderr
    assert not (tmp_path/'models'/'doomed').exists()  # so the same command can simply be run again


def test_an_unwritable_models_folder_is_one_line(tiny_data, tmp_path):
    (tmp_path/'a-file').touch()
    result = run_cli('train', *smoke_flags(tiny_data, training__models_dir=tmp_path/'a-file'/'models'), cwd=tmp_path)
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]  # earlier lines are Lightning's and MLflow's notices
    assert last.startswith('cifar10 train: error:') and 'Not a directory' in last and 'a-file' in last, last


@pytest.mark.parametrize('content, key', [('training:\n  max_epoch: 3\n', 'training.max_epoch'),
                                          ('model:\n  arch: resnet50\n', 'model.arch'),
                                          ('training:\n  lr:\n', 'training.lr')])
def test_bad_config_files_are_refused(content, key, tmp_path):
    (tmp_path/'bad.yaml').write_text(content)
    result = run_cli('train', '--config', tmp_path/'bad.yaml', cwd=tmp_path)
    assert result.returncode != 0 and key in result.stderr and 'Traceback' not in result.stderr, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ['bad.yaml']


def test_unreachable_tracking_server_is_reported_before_training(tiny_data, tmp_path):
    start = time.time()
    result = run_cli('train', *smoke_flags(tiny_data, logging__tracking_uri='http://127.0.0.1:9'), cwd=tmp_path)
    assert result.returncode == 1 and 'does not answer' in result.stderr and 'Traceback' not in result.stderr
    assert time.time() - start < 60 and not (tmp_path/'models').exists()


def test_checkpoint_names(tmp_path):
    (tmp_path/'models'/'some-run').mkdir(parents=True)
    torch.save({}, tmp_path/'models'/'some-run'/'last.ckpt')
    missing = run_cli('infer', '--checkpoint_name', 'other-run', cwd=tmp_path)
    assert missing.returncode == 1 and 'there are: some-run' in missing.stderr and '/best' not in missing.stderr
    escape = run_cli('infer', '--checkpoint_name', '../../etc/passwd', cwd=tmp_path)
    assert escape.returncode == 1 and 'not a checkpoint name' in escape.stderr
