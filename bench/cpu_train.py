"""The CPU preset on the full training set, on this machine: wall time and test accuracy.

Runs `cifar10 train --config conf/cpu.yaml` as a user would (a subprocess, from the first import to the
registered model), tracking into a temporary store, and prints the wall time, the training time per epoch
(as the run logged it, `time/epoch_seconds`) and the test accuracy. The last line is `test_accuracy: <0..1>`.

    python bench/cpu_train.py [--data_dir data] [--config conf/cpu.yaml]
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data_dir', default='data')
    parser.add_argument('--config', default='conf/cpu.yaml')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        uri = f'sqlite:///{folder}/mlflow.db'
        command = [str(Path(sys.executable).parent/'cifar10'), 'train', '--config', args.config,
                   '--data.data_dir', str(Path(args.data_dir).resolve()), '--training.models_dir', f'{folder}/models',
                   '--logging.tracking_uri', uri, '--logging.run_name', 'bench-cpu', '--logging.progress_bar', 'false']
        start = time.perf_counter()
        subprocess.run(command, check=True)
        wall = time.perf_counter() - start
        client = mlflow.MlflowClient(uri)
        [run] = client.search_runs([client.get_experiment_by_name('cifar10').experiment_id])
        epochs = sorted(client.get_metric_history(run.info.run_id, 'val/acc'), key=lambda m: m.step)
        seconds = [m.value for m in client.get_metric_history(run.info.run_id, 'time/epoch_seconds')]
        print(f'wall time {wall:.0f} s (command start to registered model); {len(epochs)} epochs, '
              f'{statistics.median(seconds):.1f} s per epoch with validation (median), {sum(seconds):.0f} s in all')
        print('validation accuracy by epoch: ' + ', '.join(f'{m.value:.4f}' for m in epochs))
        print(f'wall_seconds: {wall:.0f}')
        print(f'test_accuracy: {run.data.metrics["test/acc"]:.4f}')


if __name__ == '__main__':
    main()
