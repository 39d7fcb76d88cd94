"""Seconds until `cifar10` answers help and usage errors, against starting Python and importing torch.

Each command runs `--repeats` times, in turn, as a fresh process (what a user's shell starts); the figures
are medians. The baselines, run in the same loop: `python -c pass` (the floor: starting the interpreter) and
`python -c "import torch"` (what the command used to import before it read its arguments). Last line:
`ratio: <cifar10 --help / import torch>`.

    python bench/cli.py [--repeats 7]
"""
import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

CLI = str(Path(sys.executable).parent/'cifar10')
TORCH = 'python -c "import torch"'
COMMANDS = {'python -c pass': [sys.executable, '-c', 'pass'],
            TORCH: [sys.executable, '-c', 'import torch'],
            'cifar10 --help': [CLI, '--help'],
            'cifar10 train --help': [CLI, 'train', '--help'],
            'cifar10 infer --help': [CLI, 'infer', '--help'],
            'cifar10 train --no_such_flag': [CLI, 'train', '--no_such_flag']}


def seconds(command: list[str]) -> float:
    "Wall time of one run of `command`, its output discarded."
    start = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeats', type=int, default=7)
    args = parser.parse_args()
    times = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, command in COMMANDS.items(): times[name].append(seconds(command))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items(): print(f'{name:32s} {median:6.3f} s (median of {args.repeats})')
    print(f'ratio: {medians["cifar10 --help"] / medians[TORCH]:.3f}')


if __name__ == '__main__': main()
