"""The repository keeps its promises: the package is what the notebooks export, the notebooks are clean,
README.md is index.ipynb, the notebooks are ready for the docs site, and every command has --help."""
import filecmp
import shutil
import subprocess
import sys

import mlflow
import nbformat
import pytest
from conftest import ROOT, VENV_BIN, cli_env, free_port, run_cli, stop, wait_until_healthy


def run(*cmd, cwd):
    result = subprocess.run(cmd, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f'{cmd}:\n{result.stdout}\n{result.stderr}'
    return result


@pytest.fixture
def copy(tmp_path):
    "A copy of the parts of the repo that nbdev reads and writes."
    for name in ('settings.ini', 'pyproject.toml', 'Makefile', '_quarto.yml'): shutil.copy(ROOT/name, tmp_path/name)
    shutil.copytree(ROOT/'nbs', tmp_path/'nbs', symlinks=True)
    shutil.copytree(ROOT/'cifar10', tmp_path/'cifar10', ignore=shutil.ignore_patterns('__pycache__'))
    return tmp_path


def same_files(a, b, names):
    mismatch = [n for n in names if not filecmp.cmp(a/n, b/n, shallow=False)]
    assert not mismatch, f'{mismatch} differ'


def test_package_is_exported_from_the_notebooks(copy):
    run('nbdev_export', cwd=copy)
    names = sorted(p.name for p in (ROOT/'cifar10').glob('*.py'))
    assert sorted(p.name for p in (copy/'cifar10').glob('*.py')) == names
    same_files(ROOT/'cifar10', copy/'cifar10', names)


def test_notebooks_are_clean(copy):
    run('nbdev_clean', cwd=copy)
    same_files(ROOT/'nbs', copy/'nbs', [p.name for p in (ROOT/'nbs').glob('*.ipynb')])


def test_readme_is_the_index_notebook(copy):
    run('make', '-s', 'readme', cwd=copy)
    same_files(ROOT, copy, ['README.md'])


@pytest.mark.slow
def test_notebooks_are_ready_for_the_docs_site():
    "nbdev's docs processing (what `nbdev_docs` runs before Quarto) takes every notebook without a warning."
    result = run(sys.executable, '-c', 'import nbdev.serve; nbdev.serve.proc_nbs(force=True)', cwd=ROOT)
    assert 'Warning' not in result.stderr, result.stderr
    processed = {p.name for p in (ROOT/'_proc').iterdir()}
    assert {p.name for p in (ROOT/'nbs').glob('*.ipynb')} | {'_quarto.yml'} <= processed


@pytest.mark.parametrize('command', [[], ['data'], ['train'], ['infer'], ['export'], ['serve']])
def test_help(command):
    result = run_cli(*command, '--help')
    assert result.returncode == 0 and 'usage: cifar10' in result.stdout


@pytest.mark.parametrize('name', ['conf/smoke.yaml', 'conf/cpu.yaml', 'conf/gpu.yaml'])
def test_presets_are_valid_configurations(name):
    "A preset with an unknown key or a bad value would raise here, naming the key."
    from cifar10.config import load_config
    load_config(ROOT/name)


def test_dvc_params_are_the_pipeline_run():
    "dvc.yaml's stages read models/pipeline and models/pipeline.ipynb: params.yaml must name the run so."
    from cifar10.config import load_config
    assert load_config(ROOT/'params.yaml').logging.run_name == 'pipeline'


def test_dvc_params_are_the_defaults_but_for_the_run_name():
    "params.yaml spells out every setting for `dvc exp run -S`; it must not drift from the configuration's defaults."
    from cifar10.config import load_config
    pipeline = {'logging': {'run_name': 'pipeline', 'progress_bar': False}}
    assert load_config(ROOT/'params.yaml') == load_config(overrides=pipeline)


def test_help_and_usage_errors_import_no_training_stack():
    "Help and usage errors answer before torch, Lightning or MLflow are imported (they take seconds to import)."
    code = ('import contextlib, io, sys\n'
            'from cifar10.cli import main\n'
            'for argv in ([], ["--help"], ["train", "--help"], ["infer", "--help"], ["export", "--help"],\n'
            '             ["serve", "--help"], ["data", "--help"], ["train", "--no_such_flag"]):\n'
            '    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n'
            '        try: main(argv)\n'
            '        except SystemExit: pass\n'
            'print(sorted(m for m in ("torch", "lightning", "mlflow", "numpy") if m in sys.modules))\n')
    assert run(sys.executable, '-c', code, cwd=ROOT).stdout.strip() == '[]'


def test_help_texts_say_what_is_required():
    main = run_cli('--help').stdout
    assert '(required)' not in main and 'cifar10 COMMAND --help' in main, main
    infer = ' '.join(run_cli('infer', '--help').stdout.split())
    assert 'none: evaluate on the test split (required' not in infer, infer  # the paths are optional
    train = run_cli('train', '--help').stdout
    titles = [line for line in train.splitlines() if line and not line.startswith(' ') and line.endswith(':')]
    assert titles and not [t for t in titles if t.endswith('.:')], titles


def test_make_docs_without_quarto_is_one_line(tmp_path):
    path = f'{VENV_BIN}:/usr/bin:/bin'
    if shutil.which('quarto', path=path): pytest.skip('Quarto is installed here')
    shutil.copy(ROOT/'Makefile', tmp_path)
    result = subprocess.run(['make', '-s', '-o', 'install', 'docs'], cwd=tmp_path, env=cli_env(PATH=path),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and result.stdout == '', result.stdout
    [line] = result.stderr.strip().splitlines()[:1]
    assert 'Quarto is not installed' in line and 'https://quarto.org' in line and 'make readme' in line, result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2  # our line, and make's own "Error 1"
    assert not (tmp_path/'_docs').exists()


@pytest.mark.slow
def test_make_mlflow_serves_on_a_chosen_port_and_links_to_the_runs_table(tmp_path, browser):
    "`make mlflow PORT=...` prints the link to the cifar10 runs table; a real browser opens it on that table."
    client = mlflow.MlflowClient(f'sqlite:///{tmp_path}/mlflow.db')
    client.create_experiment('another')  # so that cifar10 is not the first experiment
    experiment = client.create_experiment('cifar10', artifact_location=(tmp_path/'mlartifacts').as_uri())
    client.set_terminated(client.create_run(experiment, run_name='a-listed-run').info.run_id)
    shutil.copy(ROOT/'Makefile', tmp_path)
    port = free_port()
    with open(tmp_path/'make.log', 'w') as log:
        server = subprocess.Popen(['make', '-s', '-o', 'install', 'mlflow', f'PORT={port}', f'VENV={VENV_BIN.parent}'],
                                  cwd=tmp_path, env=cli_env(), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        wait_until_healthy(f'http://127.0.0.1:{port}/health', server, tmp_path/'make.log')
        first = (tmp_path/'make.log').read_text().splitlines()[0]
        link = f'http://127.0.0.1:{port}/#/experiments/{experiment}/runs?workflowType=machine_learning'
        assert first == f'the runs of the cifar10 experiment: {link}', first
        page = browser.new_page()
        page.goto(link)
        # the model-training runs table: its heading is exactly 'Runs' (the page without workflowType says
        # 'Training runs'); the heading and the table render in either order, so each is waited for
        page.get_by_text('a-listed-run').first.wait_for(timeout=60_000)
        page.get_by_role('heading', name='Runs', exact=True).first.wait_for(timeout=60_000)
        page.close()
    finally: stop(server)


@pytest.mark.parametrize('name', sorted(p.name for p in (ROOT/'nbs').glob('*.ipynb')))
def test_notebooks_are_valid_and_normal(name):
    "nbformat takes each notebook as it is: valid, and nothing for its normalizer to change (ids, minor version ...)."
    notebook = nbformat.read(ROOT/'nbs'/name, as_version=nbformat.NO_CONVERT)
    nbformat.validate(notebook)
    changes, _ = nbformat.validator.normalize(notebook)
    assert changes == 0 and notebook.nbformat == 4 and notebook.nbformat_minor == 5


@pytest.mark.slow
def test_jupyterlab_opens_notebooks_unmodified_and_saves_them_clean(tmp_path, browser):
    "In a real JupyterLab with the project's server settings, a notebook opens unmodified and saves byte for byte."
    names = ('01_model.ipynb', 'train.ipynb')
    (tmp_path/'nbs').mkdir()
    shutil.copy(ROOT/'settings.ini', tmp_path)
    for name in names: shutil.copy(ROOT/'nbs'/name, tmp_path/'nbs'/name)
    run('nbdev_clean', '--fname', 'nbs', cwd=tmp_path)  # as committed (test_notebooks_are_clean checks that)
    port, jupyter = free_port(), tmp_path/'jupyter'
    env = cli_env(JUPYTER_CONFIG_DIR=str(jupyter/'config'), JUPYTER_RUNTIME_DIR=str(jupyter/'runtime'),
                  JUPYTERLAB_WORKSPACES_DIR=str(jupyter/'workspaces'))
    with open(tmp_path/'lab.log', 'w') as log:
        lab = subprocess.Popen([VENV_BIN/'jupyter', 'lab', '--allow-root', '--no-browser', '--ip=127.0.0.1',
                                f'--port={port}', '--IdentityProvider.token=test',
                                f'--config={ROOT}/jupyter_server_config.py'],
                               cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_healthy(f'http://127.0.0.1:{port}/api/status?token=test', lab, tmp_path/'lab.log')
        for name in names:
            before = (tmp_path/'nbs'/name).read_bytes()
            page = browser.new_page()
            page.goto(f'http://127.0.0.1:{port}/lab/tree/nbs/{name}?token=test&reset')
            page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]', state='attached',
                                   timeout=120_000)  # the kernel has started and described itself
            page.wait_for_timeout(2000)
            assert page.locator('.lm-TabBar-tab.jp-mod-dirty').count() == 0, f'{name} is marked modified on opening'
            page.keyboard.press('Control+s')
            page.wait_for_timeout(2000)
            assert (tmp_path/'nbs'/name).read_bytes() == before, f'saving {name} changed it'
            page.close()
    finally: stop(lab)
