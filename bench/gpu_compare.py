"""The GPU comparison of issue 9: airbench94 and `conf/gpu.yaml`, on the same GPU and data, one after the other.

1. `python ../shared/peers/airbench/run_airbench.py --data_dir DATA --runs N`: airbench94's own code, its
   mean test accuracy over runs 2..N and median training time (the first run warms up cuDNN).
2. N runs of `conf/gpu.yaml` through papermill (`nbs/train.ipynb`), seeds 0..N-1, each a fresh process
   tracking into a temporary SQLite store: test accuracy and training time (the sum of the epochs' wall
   times as the run logged them, its first epoch's warm-up included).

Both sets of figures and the GPU's name go to `--output` (JSON) and are printed; the last lines are
`project_accuracy`, `project_seconds`, `airbench_accuracy`, `airbench_seconds`. `--tiny` checks the
script on a CPU in minutes: a smoke-sized preset, and airbench only where there is CUDA.

    python bench/gpu_compare.py [--runs 5] [--config conf/gpu.yaml] [--output bench/results/gpu-compare.json]
    python bench/gpu_compare.py --tiny --runs 2 --output /tmp/gpu-compare.json
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
AIRBENCH = ROOT.parent/'shared'/'peers'/'airbench'/'run_airbench.py'
TINY = {'data': {'subset': 2048, 'batch_size': 256}, 'model': {'width': 8}, 'training': {'max_epochs': 2}}


def airbench(data_dir: Path, runs: int) -> dict:
    "airbench94's mean accuracy and median time on `data_dir`, from its runner's last lines."
    if not torch.cuda.is_available(): return {'skipped': 'airbench needs a CUDA GPU'}
    result = subprocess.run([sys.executable, str(AIRBENCH), '--data_dir', str(data_dir), '--runs', str(runs)],
                            capture_output=True, text=True, check=True)
    figures = dict(re.findall(r'^(airbench_\w+): ([\d.]+)$', result.stdout, re.M))
    return {'accuracy': float(figures['airbench_accuracy']), 'seconds': float(figures['airbench_seconds']),
            'runs': runs, 'log': result.stdout[-3000:]}


def project_run(config: str, seed: int, data_dir: Path, folder: Path, extra: dict) -> dict:
    "One papermill run of the training notebook with `config`: its test accuracy and training time."
    uri = f'sqlite:///{folder}/mlflow.db'
    settings = {'data': {'data_dir': str(data_dir), **extra.get('data', {})}, 'model': extra.get('model', {}),
                'training': {'seed': seed, 'models_dir': str(folder/'models'), **extra.get('training', {})},
                'logging': {'tracking_uri': uri, 'run_name': f'gpu-compare-{seed}', 'progress_bar': False}}
    subprocess.run(['papermill', str(ROOT/'nbs'/'train.ipynb'), str(folder/f'run-{seed}.ipynb'), '-p', 'config_file',
                    config, '-y', yaml.safe_dump(settings), '--log-level', 'WARNING'], cwd=ROOT, check=True)
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs(client.get_experiment_by_name('cifar10').experiment_id,
                               f"attributes.run_name = 'gpu-compare-{seed}'")
    epochs = [m.value for m in client.get_metric_history(run.info.run_id, 'time/epoch_seconds')]
    return {'seed': seed, 'accuracy': run.data.metrics['test/acc'], 'seconds': sum(epochs), 'epochs': len(epochs)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data_dir', default='data')
    parser.add_argument('--runs', type=int, default=5)
    parser.add_argument('--config', default='conf/gpu.yaml')
    parser.add_argument('--output', default='bench/results/gpu-compare.json')
    parser.add_argument('--tiny', action='store_true', help='a smoke-sized check of the script itself, on any machine')
    args = parser.parse_args()
    data_dir = Path(args.data_dir).resolve()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'none (CPU)'
    report = {'gpu': gpu, 'torch': torch.__version__, 'config': args.config, 'tiny': args.tiny}
    report['airbench'] = airbench(data_dir, args.runs)
    with tempfile.TemporaryDirectory() as folder:
        extra = dict(TINY, training={**TINY['training'], 'accelerator': 'auto'}) if args.tiny else {}
        runs = [project_run(args.config, seed, data_dir, Path(folder), extra) for seed in range(args.runs)]
    report['project'] = {'runs': runs, 'accuracy': statistics.mean(r['accuracy'] for r in runs),
                         'seconds': statistics.median(r['seconds'] for r in runs)}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + '.partial')  # written whole, then renamed: never half a report
    partial.write_text(json.dumps(report, indent=2) + '\n')
    partial.replace(output)
    print(f'GPU: {gpu}')
    for r in runs:
        print(f'project seed {r["seed"]}: {r["accuracy"]:.4f} in {r["seconds"]:.2f} s ({r["epochs"]} epochs)')
    print(f'project_accuracy: {report["project"]["accuracy"]:.4f}')
    print(f'project_seconds: {report["project"]["seconds"]:.3f}')
    for key in ('accuracy', 'seconds'):
        value = report['airbench'].get(key)
        print(f'airbench_{key}: ' + (f'{value:.4f}' if value is not None else report['airbench']['skipped']))


if __name__ == '__main__':
    main()
