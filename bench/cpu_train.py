"""`cifar10 train` on the full training set, on this machine: wall time and test accuracy, seed by seed.

Runs `cifar10 train` as `make train` does (the embedded defaults unless `--config` names a preset; `--set`
adds flags), one seed after the other, each as a user would: a subprocess, timed from the command's start
to the registered model, tracking into a temporary store. Prints each seed's wall time, training time
(the run's `time/epoch_seconds`, summed) and test accuracy, then the median and range over the seeds, and
appends one JSON line per seed to `--output` when given. The last line is `test_accuracy: <median>`.

    python bench/cpu_train.py [--seeds 3] [--first_seed 0] [--config conf/cpu.yaml]
                              [--set model.width=64 training.max_epochs=10] [--output bench/results/cpu-train.jsonl]
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow


def train(seed: int, args, folder: str) -> dict:
    "One `cifar10 train` run of `seed`: what it measured and how long it took."
    uri = f'sqlite:///{folder}/mlflow.db'
    command = [str(Path(sys.executable).parent/'cifar10'), 'train', *(['--config', args.config] if args.config else []),
               '--data.data_dir', str(Path(args.data_dir).resolve()), '--training.models_dir', f'{folder}/models',
               '--training.seed', str(seed), '--logging.tracking_uri', uri, '--logging.run_name', f'bench-{seed}',
               '--logging.progress_bar', 'false']
    for item in args.set:
        key, value = item.split('=', 1)
        command += [f'--{key}', value]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name('cifar10').experiment_id])
    seconds = [m.value for m in client.get_metric_history(run.info.run_id, 'time/epoch_seconds')]
    return {'seed': seed, 'config': args.config, 'set': args.set, 'wall_seconds': round(wall, 1),
            'train_seconds': round(sum(seconds), 1), 'epochs': len(seconds),
            'test_accuracy': run.data.metrics['test/acc'], 'load': Path('/proc/loadavg').read_text().split()[:3]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data_dir', default='data')
    parser.add_argument('--config', default=None, help='a preset (default: the embedded defaults, as make train)')
    parser.add_argument('--set', nargs='*', default=[], help='section.key=value flags of every run')
    parser.add_argument('--seeds', type=int, default=3)
    parser.add_argument('--first_seed', type=int, default=0, help='seeds first_seed, first_seed + 1, ...')
    parser.add_argument('--output', default=None, help='a JSON-lines file to append each seed\'s figures to')
    args = parser.parse_args()
    records = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        with tempfile.TemporaryDirectory() as folder: record = train(seed, args, folder)
        print(f'seed {seed}: wall time {record["wall_seconds"]:.0f} s (command start to registered model), '
              f'{record["epochs"]} epochs, {record["train_seconds"]:.0f} s of training; '
              f'test accuracy {record["test_accuracy"]:.4f}', flush=True)
        if args.output:
            with open(args.output, 'a') as f: f.write(json.dumps(record) + '\n')
        records.append(record)
    for key in ('wall_seconds', 'test_accuracy'):
        values = [r[key] for r in records]
        print(f'{key}: median {statistics.median(values):.4f}, range {min(values):.4f}-{max(values):.4f}')
    print(f'wall_seconds: {statistics.median(r["wall_seconds"] for r in records):.0f}')
    print(f'test_accuracy: {statistics.median(r["test_accuracy"] for r in records):.4f}')


if __name__ == '__main__':
    main()
