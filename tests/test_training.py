"""Training end to end on tiny data: the CLI against a real MLflow server, papermill, the registry's champion,
resuming a killed run, seeding, and bad configurations refused before any work starts."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import nbformat
import pytest
import torch
import yaml
from conftest import CLI, ROOT, cli_env, run_cli

from cifar10.config import Config, flat_params, load_config
from cifar10.data import CLASSES
from cifar10.trainer import fit

SMOKE = ROOT/'conf'/'smoke.yaml'


def smoke_flags(data_dir, **settings) -> list[str]:
    "Flags for a smoke run on `data_dir` (whole splits: they are tiny), plus `settings` as section.key=value."
    flags = ['--config', SMOKE, '--data.data_dir', data_dir, '--data.subset', 'null']
    for key, value in settings.items(): flags += [f'--{key.replace("__", ".")}', value]
    return flags


@pytest.mark.slow
def test_cli_train_tracks_everything_on_a_server(tiny_data, mlflow_server, tmp_path):
    result = run_cli('train', *smoke_flags(tiny_data, data__val_size='200', training__models_dir=tmp_path/'models',
                                           logging__tracking_uri=mlflow_server, logging__run_name='cli-run',
                                           logging__registered_model='cli-model'), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'run cli-run: test accuracy' in result.stdout and 'version 1' in result.stdout
    client = mlflow.MlflowClient(mlflow_server)
    [run] = client.search_runs(client.get_experiment_by_name('cifar10').experiment_id,
                               "attributes.run_name = 'cli-run'")
    params, metrics = run.data.params, run.data.metrics
    assert params['training.max_epochs'] == '2' and params['model.arch'] == 'fastnet'
    assert params.keys() == flat_params(Config()).keys()
    steps_per_epoch = (1000 - 200) // 128
    assert len(client.get_metric_history(run.info.run_id, 'train/loss')) == 2 * steps_per_epoch  # every step
    assert len(client.get_metric_history(run.info.run_id, 'lr/weights')) == 2 * steps_per_epoch
    assert len(client.get_metric_history(run.info.run_id, 'val/acc')) == 1  # the final model's (val_every_n_epochs)
    assert {'test/acc', 'test/loss'} <= metrics.keys() and 0 <= metrics['test/acc'] <= 1
    assert not [key for key in metrics if key.startswith('test/acc/')]  # per class: one table, not ten charts
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    artifacts |= {a.path for a in client.list_artifacts(run.info.run_id, 'checkpoints')}
    assert {'confusion_matrix.png', 'test_class_accuracy.json', 'checkpoints/best.ckpt',
            'checkpoints/last.ckpt'} <= artifacts
    table = Path(client.download_artifacts(run.info.run_id, 'test_class_accuracy.json', str(tmp_path)))
    table = json.loads(table.read_text())
    assert [row[0] for row in table['data']] == list(CLASSES)
    tags = run.data.tags
    assert tags['mlflow.source.name'] == 'cifar10 train' and tags['preset'] == str(SMOKE)
    note = tags['mlflow.note.content']
    assert str(SMOKE) in note and 'fastnet of width 8' in note and f'{metrics["test/acc"]:.2%}' in note, note
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


def papermill(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    "Run papermill on the training notebook with `args`, as the README does."
    return subprocess.run(['papermill', ROOT/'nbs'/'train.ipynb', *args, '--log-level', 'WARNING'],
                          cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_papermill_runs_the_training_notebook(tiny_data, tmp_path):
    out = tmp_path/'executed.ipynb'
    overrides = {'data': {'data_dir': str(tiny_data), 'subset': None},
                 'logging': {'tracking_uri': f'sqlite:///{tmp_path}/mlflow.db', 'run_name': 'notebook-run'}}
    training = f'{{models_dir: {tmp_path/"models"}}}'  # a section given as a string is read as YAML
    result = papermill(out, '-p', 'config_file', SMOKE, '-p', 'training', training, '-y', yaml.safe_dump(overrides),
                       '--inject-output-path')
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'ERROR' not in result.stderr and 'Traceback' not in result.stderr, result.stderr  # ended cleanly too
    cells = {c.source: c.outputs for c in nbformat.read(out, as_version=4).cells if c.cell_type == 'code'}
    outputs = ''.join(o.get('text', '') for cell in cells.values() for o in cell)
    assert 'run notebook-run: test accuracy' in outputs and 'registered and made the champion' in outputs
    for plot in ('plot_history(run);', 'confusion_figure(run.confusion);'):
        assert [o for o in cells[plot] if 'image/png' in o.get('data', {})], f'{plot} shows no figure'
    assert (tmp_path/'models'/'notebook-run'/'last.ckpt').is_file()
    client = mlflow.MlflowClient(f'sqlite:///{tmp_path}/mlflow.db')
    [run] = client.search_runs(client.get_experiment_by_name('cifar10').experiment_id)
    assert run.data.params['data.subset'] == 'None' and run.data.params['training.max_epochs'] == '2'
    assert run.data.tags['mlflow.source.name'] == 'nbs/train.ipynb' and run.data.tags['preset'] == str(SMOKE)
    assert [a.path for a in client.list_artifacts(run.info.run_id, 'notebook')] == ['notebook/executed.ipynb']
    [version] = client.search_model_versions("name = 'cifar10-smoke'")  # the smoke preset's own registry name
    assert version.run_id == run.info.run_id


def test_papermill_refuses_a_section_that_is_not_settings(tmp_path):
    result = papermill(tmp_path/'executed.ipynb', '-p', 'training', 'max_epochs=2')
    assert result.returncode != 0
    assert "ConfigError: training: expected its settings, e.g. -y \"training: {key: value}\", got 'max_epochs=2'" \
        in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
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
    epochs = {m.step for m in client.get_metric_history(run_id, 'time/epoch_seconds')}
    assert len(epochs) == 8 and 'test/acc' in client.get_run(run_id).data.metrics  # one run, all epochs

    last.write_bytes(last.read_bytes()[:last.stat().st_size // 2])  # a copy cut short
    damaged = run_cli('train', '--resume', 'killed', cwd=tmp_path)
    assert damaged.returncode == 1 and 'Traceback' not in damaged.stderr, damaged.stderr
    line = damaged.stderr.strip().splitlines()[-1]
    assert line.startswith('cifar10 train: error: models/killed/last.ckpt: damaged') and 'start a new run' in line, line


@pytest.mark.slow
def test_the_champion_moves_only_to_a_better_model(tiny_data, mlflow_server, tmp_path):
    "Every run registers a version; `champion` goes to the first, stays for a worse one and moves to a better one."
    def train(name, **training):
        flags = smoke_flags(tiny_data, data__val_size='200', training__models_dir=tmp_path/'models',
                            logging__tracking_uri=mlflow_server, logging__run_name=name,
                            logging__registered_model='champion-test',
                            **{f'training__{key}': value for key, value in training.items()})
        result = run_cli('train', *flags, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()[-1]  # what the registry made of it
    # better and worse by training, on the same 200 held-out images; the test split chooses nothing
    assert train('first', max_epochs='2') == 'champion-test version 1 registered and made the champion, the first'
    worse = train('crippled', max_epochs='1', warmup_epochs='0', lr='1e-6')
    assert worse.startswith('champion-test version 2 registered; the champion stays version 1: its val/acc'), worse
    better = train('longer', max_epochs='8')
    assert better.startswith('champion-test version 3 registered and made the champion (val/acc'), better
    client = mlflow.MlflowClient(mlflow_server)
    assert str(client.get_model_version_by_alias('champion-test', 'champion').version) == '3'
    tags = [client.get_model_version('champion-test', v).tags for v in ('1', '2', '3')]
    assert float(tags[1]['val/acc']) < float(tags[0]['val/acc']) < float(tags[2]['val/acc'])
    assert {t['data.val_size'] for t in tags} == {'200'} and tags[1]['champion'] == worse

    served = run_cli('infer', '--checkpoint_name', 'models:/champion-test@champion', '--data_dir', tiny_data,
                     cwd=tmp_path, env=cli_env(MLFLOW_TRACKING_URI=mlflow_server))
    assert served.returncode == 0 and 'accuracy' in served.stdout, served.stderr


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
