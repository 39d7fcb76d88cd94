"""Test-set images per second of a trained model: eager PyTorch against its exported ONNX paths, on the CPU.

Loads the checkpoint with the torch backend and with the ONNX backends (onnx and openvino run
`last.onnx`, onnx-int8 runs `last.int8.onnx`; both are exported first if missing), then times each over
the whole test split in batches of `--batch_size`, with `--threads` threads, `--repeats` times,
alternating; the figures are medians. It prints each path's images per second, accuracy and top-1
agreement with eager PyTorch. The last line is `ratio: <openvino / eager>`, the exported path meant for
serving.

    python bench/infer.py --checkpoint_name RUN [--models_dir models] [--data_dir data]
"""
import argparse
import statistics
import time

import numpy as np
import torch

from cifar10.config import ExportSettings, PredictorSettings
from cifar10.data import load_split
from cifar10.export import export_checkpoint
from cifar10.infer import ONNX_FILES, checkpoint_path, is_export_of, load_predictor, onnx_description


def images_per_second(predictor, images, batch_size) -> float:
    start = time.perf_counter()
    for i in range(0, len(images), batch_size): predictor.logits(images[i:i + batch_size])
    return len(images) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--checkpoint_name', required=True)
    parser.add_argument('--models_dir', default='models')
    parser.add_argument('--data_dir', default='data')
    parser.add_argument('--batch_size', type=int, default=256)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = checkpoint_path(args.checkpoint_name, args.models_dir)
    for format in ('onnx', 'onnx-int8'):  # (re)export what is missing or was exported from an older checkpoint
        export = path.with_suffix(ONNX_FILES[format])
        if not export.is_file() or not is_export_of(onnx_description(export), path):
            export_checkpoint(ExportSettings(args.checkpoint_name, args.models_dir, format, args.data_dir))
    predictors = {backend: load_predictor(PredictorSettings(args.checkpoint_name, args.models_dir, backend,
                                                            threads=args.threads))
                  for backend in ('torch', *ONNX_FILES)}
    images, labels = load_split(args.data_dir, 'test')
    images = np.array(images)
    predictions = {name: np.concatenate([p.logits(images[i:i + 1000]) for i in range(0, len(images), 1000)]).argmax(1)
                   for name, p in predictors.items()}
    for p in predictors.values(): images_per_second(p, images[:1024], args.batch_size)  # warm up
    rates = {name: [] for name in predictors}
    for _ in range(args.repeats):
        for name, p in predictors.items(): rates[name].append(images_per_second(p, images, args.batch_size))
    medians = {name: statistics.median(r) for name, r in rates.items()}
    print(f'checkpoint {path}, {len(images)} test images, batch {args.batch_size}, {args.threads} threads')
    for name in predictors:
        print(f'{name:10s} {medians[name]:8.0f} images/s  accuracy {np.mean(predictions[name] == labels):.4f}  '
              f'top-1 agreement with eager {np.mean(predictions[name] == predictions["torch"]):.4%}  '
              f'(runs: {", ".join(f"{r:.0f}" for r in rates[name])})')
    for name in ('onnx', 'onnx-int8'): print(f'ratio_{name}: {medians[name] / medians["torch"]:.2f}')
    print(f'ratio: {medians["openvino"] / medians["torch"]:.2f}')


if __name__ == '__main__':
    main()
