"""The repository keeps its promises: the package is what the notebooks export, the notebooks are clean,
README.md is index.ipynb, the notebooks are ready for the docs site, and every command has --help."""
import filecmp
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, cli_env, run_cli


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
