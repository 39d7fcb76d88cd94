"""What each part of the training recipe is worth: accuracy and time with it, and with it taken out.

Each variant is the configuration (`--config`, plus `--set` overrides) with one part of airbench's recipe
taken out or changed, trained with `fit` for several seeds, one after the other in this process. Every
run holds out `--val_size` training images (the same ones for all, `data.val_size`) and is judged by its
accuracy on them: the defaults are chosen on these, never on the test split, whose accuracy is printed
beside only for reference. The test-time augmentation rows need no training of their own: they evaluate
the full recipe's final models on the held-out images with each level. Every run appends a line to
`--output` (JSON), so an interrupted benchmark keeps what it measured and `--resume` skips the runs
already there. The table is printed at the end, in Markdown (`--table` prints it from `--output` without
training): the trainer chapter shows it. Last line: `full_recipe_val_accuracy: <mean>`.

    python bench/recipe.py [--config conf/cpu.yaml] [--set model.width=16 training.max_epochs=4]
                           [--seeds 3] [--variants 'full recipe' 'no lookahead'] [--val_size 5000]
                           [--output bench/results/recipe-val-cpu.jsonl] [--resume] [--table]
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import mlflow
import torch
import yaml

from cifar10.config import load_config
from cifar10.model import TTA_LEVELS, tta_logits
from cifar10.trainer import Classifier, datamodule_for, fit

# each variant: what it takes out of the full recipe, as configuration overrides
VARIANTS = {
    'full recipe': {},
    'no lookahead': {'training': {'lookahead_every': 0}},
    'norm scales learned, biases at the weights\' step': {'training': {'norm_scales': True, 'bias_lr_scale': 1.0}},
    'whitening biases never learn': {'training': {'whiten_bias_epochs': 0}},
    'whitening biases learn throughout': {'training': {'whiten_bias_epochs': 1000}},
    'random flips': {'data': {'flip': 'random'}},
    'batches of 512': {'data': {'batch_size': 512}},
    'lr × 0.5': {'training': {'lr_scale': 0.5}},
    'lr × 2': {'training': {'lr_scale': 2.0}},
    'weight decay × 0.5': {'training': {'wd_scale': 0.5}},
    'weight decay × 2': {'training': {'wd_scale': 2.0}},
    # sizes that train in about 8 of make train's 10 minutes on 2 cores, 1.8 times as long as width 32 for
    # 12 epochs (the default until width 48 for 13 was chosen with these)
    'width 32, 22 epochs': {'model': {'width': 32}, 'training': {'max_epochs': 22}},
    'width 48, 13 epochs': {'model': {'width': 48}, 'training': {'max_epochs': 13}},
    'width 64, 8 epochs': {'model': {'width': 64}, 'training': {'max_epochs': 8}},
}


def merge(base: dict, extra: dict) -> dict:
    "`base` with `extra`'s sections merged in key by key."
    return {s: {**base.get(s, {}), **extra.get(s, {})} for s in {*base, *extra}}


def scaled(overrides: dict, defaults) -> dict:
    "`lr_scale`/`wd_scale` turned into `lr`/`weight_decay` relative to the configuration's own values."
    training = dict(overrides.get('training', {}))
    for key, field in (('lr_scale', 'lr'), ('wd_scale', 'weight_decay')):
        if key in training: training[field] = getattr(defaults.training, field) * training.pop(key)
    return {**overrides, 'training': training}


@torch.inference_mode()
def tta_accuracies(checkpoint: Path, cfg) -> dict:
    "Accuracy of a checkpoint's network on the run's held-out images (`cfg`) with each test-time augmentation level."
    module = Classifier.load_from_checkpoint(checkpoint, map_location='cpu', weights_only=False).eval()
    data = datamodule_for(cfg, '32-true', channels_last=False)
    data.setup()
    correct, total = dict.fromkeys(TTA_LEVELS, 0), 0
    for images, labels in data.val_dataloader():
        total += len(labels)
        for level in TTA_LEVELS:
            with torch.autocast('cpu', dtype=torch.bfloat16):
                correct[level] += (tta_logits(module.net, images, level).argmax(1) == labels).sum().item()
    return {level: right / total for level, right in correct.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', default='conf/cpu.yaml')
    parser.add_argument('--set', nargs='*', default=[], help='section.key=value overrides of every run')
    parser.add_argument('--data_dir', default='data')
    parser.add_argument('--seeds', type=int, default=3)
    parser.add_argument('--variants', nargs='*', default=list(VARIANTS), help='which variants to run')
    parser.add_argument('--val_size', type=int, default=5000, help='training images held out to judge by')
    parser.add_argument('--output', default='bench/results/recipe-val-cpu.jsonl')
    parser.add_argument('--resume', action='store_true', help='skip the runs already in --output')
    parser.add_argument('--table', action='store_true', help='only print the table of the runs in --output')
    args = parser.parse_args()
    if args.table:
        return print_table([json.loads(line) for line in Path(args.output).read_text().splitlines()])
    common = {'data': {'data_dir': args.data_dir, 'val_size': args.val_size}, 'logging': {'progress_bar': False}}
    for item in args.set:
        key, value = item.split('=', 1)
        section, name = key.split('.')
        common = merge(common, {section: {name: yaml.safe_load(value)}})
    defaults = load_config(args.config, common)
    output = Path(args.output)
    done = [json.loads(line) for line in output.read_text().splitlines()] if args.resume and output.exists() else []
    output.parent.mkdir(parents=True, exist_ok=True)
    for seed in range(args.seeds):
        for name in args.variants:
            if any(r['variant'] == name and r['seed'] == seed for r in done): continue
            with tempfile.TemporaryDirectory() as folder:
                overrides = merge(merge(common, scaled(VARIANTS[name], defaults)), {
                    'training': {'seed': seed, 'models_dir': f'{folder}/models'},
                    'logging': {'tracking_uri': f'sqlite:///{folder}/mlflow.db', 'run_name': 'bench'}})
                cfg = load_config(args.config, overrides)
                start = time.perf_counter()
                run = fit(cfg)
                # the last validation: after the last epoch
                val = mlflow.MlflowClient(run.tracking_uri).get_metric_history(run.run_id, 'val/acc')[-1]
                record = {'variant': name, 'seed': seed, 'val_accuracy': val.value,
                          'test_accuracy': run.test_metrics['test/acc'],
                          'train_seconds': sum(run.epoch_seconds), 'wall_seconds': time.perf_counter() - start,
                          'overrides': overrides, 'load': Path('/proc/loadavg').read_text().split()[:3]}
                if name == 'full recipe':
                    record['tta'] = tta_accuracies(run.folder/'last.ckpt', cfg)
            print(json.dumps(record), flush=True)
            with output.open('a') as f: f.write(json.dumps(record) + '\n')
            done.append(record)
    print_table(done)


# forward passes an image of each test-time augmentation level
PASSES = {'none': 1, 'mirror': 2, 'mirror_translate': 6}


def print_table(records: list):
    """The variants' held-out accuracy (mean, and each seed's), its difference from the full recipe, the test
    accuracy for reference and the median training time, as the Markdown table the trainer chapter shows;
    then the full recipe's models with each test-time augmentation level."""
    rows = {}
    for r in records: rows.setdefault(r['variant'], []).append(r)
    full = statistics.mean(r['val_accuracy'] for r in rows['full recipe'])
    print('| variant (one part of the recipe taken out or changed) | held-out accuracy, mean | vs full recipe, points '
          '| seeds | test accuracy (reference) | training time, median |\n| --- | --- | --- | --- | --- | --- |')
    def row(name: str, accuracies: list, rest: str):
        difference = f'{100 * (statistics.mean(accuracies) - full):+.2f}'.replace('-0.00', '+0.00')
        seeds = ', '.join(f'{100 * a:.2f}%' for a in accuracies)
        print(f'| {name} | {100 * statistics.mean(accuracies):.2f}% | {difference} | {seeds} | {rest} |')
    for name, runs in rows.items():
        runs = sorted(runs, key=lambda r: r['seed'])
        test = statistics.mean(r['test_accuracy'] for r in runs)
        seconds = statistics.median(r['train_seconds'] for r in runs)
        row(name, [r['val_accuracy'] for r in runs], f'{100 * test:.2f}% | {seconds:.0f} s')
    tested = sorted((r for r in rows['full recipe'] if 'tta' in r), key=lambda r: r['seed'])
    for level, passes in PASSES.items():
        row(f'full recipe, test-time augmentation `{level}` ({passes} forward pass{"es" * (passes > 1)} an image)',
            [r['tta'][level] for r in tested], '|')
    print(f'full_recipe_val_accuracy: {full:.4f}')


if __name__ == '__main__':
    main()
