"""Training images per second: `cifar10 train`'s Lightning loop against a bare PyTorch loop.

Both train the same network (the preset's), on the same `DeviceLoader` batches, with the same SGD
optimizer, schedule and mixed precision. The Lightning side is the `Classifier` module under a `Trainer`
set up as `fit` sets it up (MLflow logger, learning-rate monitor, progress bar), timed over its training
batches only. The bare side is the plain `for` loop. Each side runs `--repeats` times, alternating, in
this process; the figures are medians. The last line is `ratio: <lightning / bare>`.

    python bench/overhead.py [--config conf/cpu.yaml] [--steps 20] [--repeats 3]
"""
import argparse
import statistics
import tempfile
import time
from dataclasses import asdict

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import MLFlowLogger

from cifar10.config import load_config
from cifar10.trainer import AUTOCAST_DTYPES, Classifier, datamodule_for, device_settings, sgd_with_schedule


class TrainTimer(Callback):
    "Times the training batches of the first epoch (validation, checkpoints and teardown excluded)."
    def on_train_epoch_start(self, trainer, module):
        if torch.cuda.is_available(): torch.cuda.synchronize()
        self.start = time.perf_counter()
    def on_train_epoch_end(self, trainer, module):
        if torch.cuda.is_available(): torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def lightning_rate(cfg, steps: int, folder: str) -> float:
    accelerator, precision, channels_last = device_settings(cfg.training)
    module = Classifier(asdict(cfg.model), asdict(cfg.training))
    if channels_last: module = module.to(memory_format=torch.channels_last)
    timer = TrainTimer()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=steps, limit_val_batches=0, accelerator=accelerator,
                        devices=1, precision=precision, logger=MLFlowLogger(tracking_uri=f'sqlite:///{folder}/m.db'),
                        callbacks=[timer, LearningRateMonitor('step')], enable_checkpointing=False,
                        log_every_n_steps=cfg.logging.log_every_n_steps, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(module, datamodule=datamodule_for(cfg, precision, channels_last))
    return steps * cfg.data.batch_size / timer.seconds


def bare_rate(cfg, steps: int) -> float:
    accelerator, precision, channels_last = device_settings(cfg.training)
    device = 'cuda' if accelerator == 'gpu' else 'cpu'
    module = Classifier(asdict(cfg.model), asdict(cfg.training)).to(device)
    if channels_last: module = module.to(memory_format=torch.channels_last)
    datamodule = datamodule_for(cfg, precision, channels_last)
    datamodule.device = device
    datamodule.setup()
    optimizer, schedule = sgd_with_schedule(module.net, cfg.training, len(datamodule.train_dataloader()))
    dtype = AUTOCAST_DTYPES.get(precision)
    module.train()
    batches = iter(datamodule.train_dataloader())
    if device == 'cuda': torch.cuda.synchronize()
    start = time.perf_counter()
    for _, (images, labels) in zip(range(steps), batches):
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(module.net(images), labels, label_smoothing=cfg.training.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step(); schedule.step()
    if device == 'cuda': torch.cuda.synchronize()
    return steps * cfg.data.batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', default='conf/cpu.yaml')
    parser.add_argument('--data_dir', default='data')
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()
    cfg = load_config(args.config, {'data': {'data_dir': args.data_dir}, 'logging': {'progress_bar': True}})
    rates = {'lightning': [], 'bare': []}
    with tempfile.TemporaryDirectory() as folder:
        bare_rate(cfg, 3); lightning_rate(cfg, 3, folder)  # warm up both paths (allocator, kernels)
        for _ in range(args.repeats):
            rates['lightning'].append(lightning_rate(cfg, args.steps, folder))
            rates['bare'].append(bare_rate(cfg, args.steps))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, values in rates.items():
        print(f'{name:9s} {medians[name]:8.0f} images/s (runs: {", ".join(f"{v:.0f}" for v in values)})')
    print(f'ratio: {medians["lightning"] / medians["bare"]:.3f}')


if __name__ == '__main__':
    main()
