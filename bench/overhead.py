"""Training images per second: `cifar10 train`'s Lightning loop against a bare PyTorch loop.

Both train the same network on the same `DeviceLoader` batches with the same optimizer, schedule,
lookahead and precision. The Lightning side is the loop `cifar10 train` runs: `build_trainer` with
`run_callbacks` (checkpoints, lookahead, epoch timer), an MLflow logger on a temporary SQLite store
(buffered as `fit` buffers it), the progress bar as configured. It is timed from the start of training to its
end, the epoch's checkpoint included. The bare side is a plain `for` loop over the same steps. Each
side runs `--repeats` times, alternating, in this process. The default is the
small-model setting, where the loop's own cost shows most: FastNet of width 8, batches of 32, 300 steps,
float32. The machine's speed drifts from one run to the next by more than the loop costs, so each
Lightning run is compared with the bare run right after it: the figures are the medians of those pairs'
ratios, of whole runs and of steps (a step's time is from one batch's end to the next's: fetching,
training step, lookahead; the step ratio leaves out what a run does once, the epoch's checkpoint; a
GPU is waited for at a run's start and end only, so that timing the steps adds no wait to either loop).
Last line: `ratio: <lightning / bare>`, the median of the pairs' whole-run ratios.

    python bench/overhead.py [--config PRESET] [--width 8] [--batch_size 32] [--steps 300] [--repeats 11]
"""
import argparse
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from cifar10.config import load_config
from cifar10.model import FastNet
from cifar10.trainer import (
    AUTOCAST_DTYPES,
    Classifier,
    Lookahead,
    build_trainer,
    datamodule_for,
    device_settings,
    expected_warnings_silenced,
    prepare_folder,
    run_callbacks,
    sgd_with_schedule,
    start_tracking,
    tracking_to,
)


def synchronized_clock() -> float:
    "`time.perf_counter` once a GPU's queued work is done, so that both loops are timed alike."
    if torch.cuda.is_available(): torch.cuda.synchronize()
    return time.perf_counter()


def median_step(ends: list) -> float:
    "The median seconds between consecutive batch ends."
    return statistics.median(b - a for a, b in zip(ends, ends[1:]))


class TrainTimer(L.Callback):
    "Times training, from its first step to its end (the epoch's checkpoint included), and each step's end."
    def on_train_start(self, trainer, module):
        self.start = synchronized_clock()
        self.ends = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.ends.append(time.perf_counter())

    def on_train_end(self, trainer, module):
        self.seconds = synchronized_clock() - self.start


def lightning_rate(cfg, folder: Path) -> tuple:
    "Images per second of `cifar10 train`'s loop, of the whole run and of its median step."
    _, precision, channels_last = device_settings(cfg.training)
    L.seed_everything(cfg.training.seed, verbose=False)
    module = Classifier(asdict(cfg.model), asdict(cfg.training))
    if channels_last: module = module.to(memory_format=torch.channels_last)
    run = folder/f'run{time.perf_counter_ns()}'
    uri = f'sqlite:///{folder}/mlflow.db'
    with tracking_to(uri):  # as `fit` tracks: MLflow's logging thread buffers the run's metrics
        logger = start_tracking(cfg, uri, run, resume=False)
        trainer = build_trainer(cfg, logger, [timer := TrainTimer(), *run_callbacks(cfg, run)], run)
        prepare_folder(cfg, run, logger, resume=False)  # the MLflow run starts, its parameters logged, as in `fit`
        with expected_warnings_silenced():
            trainer.fit(module, datamodule=datamodule_for(cfg, precision, channels_last))
    return trainer.global_step * cfg.data.batch_size / timer.seconds, cfg.data.batch_size / median_step(timer.ends)


def bare_rate(cfg) -> tuple:
    "Images per second of a plain loop doing the same work, of the whole run and of its median step."
    accelerator, precision, channels_last = device_settings(cfg.training)
    device = 'cuda' if accelerator == 'gpu' else 'cpu'
    L.seed_everything(cfg.training.seed, verbose=False)
    module = Classifier(asdict(cfg.model), asdict(cfg.training)).to(device)
    if channels_last: module = module.to(memory_format=torch.channels_last)
    datamodule = datamodule_for(cfg, precision, channels_last)
    datamodule.device = device
    datamodule.setup()
    loader = datamodule.train_dataloader()
    total = len(loader) * cfg.training.max_epochs
    optimizer, schedule = sgd_with_schedule(module.net, cfg.training, total, cfg.data.batch_size)
    every = cfg.training.lookahead_every
    lookahead = Lookahead(every) if every else None
    if lookahead: lookahead.average = [o.detach().clone() for o in Lookahead.tensors(module.net)]
    dtype = AUTOCAST_DTYPES.get(precision)
    module.train()
    start, step, ends = synchronized_clock(), 0, []
    for epoch in range(cfg.training.max_epochs):
        for images, labels in loader:
            with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = F.cross_entropy(module.net(images), labels, label_smoothing=cfg.training.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if isinstance(module.net, FastNet) and epoch >= cfg.training.whiten_bias_epochs:
                module.net.stem.bias.grad = None
            optimizer.step(); schedule.step()
            step += 1
            if lookahead: lookahead.after_step(module.net, step, total)
            ends.append(time.perf_counter())
    seconds = synchronized_clock() - start
    return step * cfg.data.batch_size / seconds, cfg.data.batch_size / median_step(ends)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', default=None, help='a preset (default: the embedded defaults, as cifar10 train)')
    parser.add_argument('--data_dir', default='data')
    parser.add_argument('--width', type=int, default=8)
    parser.add_argument('--batch_size', type=int, default=32)
    parser.add_argument('--steps', type=int, default=300, help='steps per run: one epoch of that many batches')
    parser.add_argument('--precision', default='32-true')
    parser.add_argument('--repeats', type=int, default=11)
    parser.add_argument('--progress_bar', default='true', choices=['true', 'false'])
    args = parser.parse_args()
    warnings.filterwarnings('ignore', message='.*does not have many workers')
    cfg = load_config(args.config, {
        'data': {'data_dir': args.data_dir, 'batch_size': args.batch_size, 'subset': args.batch_size * args.steps,
                 'val_size': 0},
        'model': {'width': args.width},
        'training': {'max_epochs': 1, 'precision': args.precision, 'warmup_epochs': 0.2},
        'logging': {'progress_bar': args.progress_bar == 'true'}})
    runs = {'lightning': [], 'bare': []}
    with tempfile.TemporaryDirectory() as folder:
        bare_rate(cfg); lightning_rate(cfg, Path(folder))  # warm up both paths (allocator, kernels, imports)
        for _ in range(args.repeats):
            runs['lightning'].append(lightning_rate(cfg, Path(folder)))
            runs['bare'].append(bare_rate(cfg))
    for name, figures in runs.items():
        whole, steps = zip(*figures)
        step_ms = 1e3 * args.batch_size / statistics.median(steps)
        print(f'{name:9s} {statistics.median(whole):6.0f} images/s, median step {step_ms:.2f} ms '
              f'(runs: {", ".join(f"{v:.0f}" for v in whole)})')
    # each Lightning run against the bare run right after it: the machine's drift between runs cancels
    ratios = {}
    for i, kind in enumerate(('whole runs', 'steps')):
        pairs = sorted(lightning[i] / bare[i] for lightning, bare in zip(runs['lightning'], runs['bare']))
        ratios[kind] = statistics.median(pairs)
        print(f'ratio of the pairs, {kind}: median {ratios[kind]:.3f} (range {pairs[0]:.3f}-{pairs[-1]:.3f})')
    print(f'ratio: {ratios["whole runs"]:.3f}')


if __name__ == '__main__':
    main()
