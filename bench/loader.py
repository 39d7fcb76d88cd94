"""Augmented training batches per second: cifar10's DeviceLoader against torchvision's DataLoader.

Both read the same arrays (`data/train`, written by `cifar10 data`) and produce normalized float32 batches
of 512 with a random 4-pixel crop/translate and a horizontal flip. torchvision's pipeline is the classic
one: PIL images through RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor and Normalize in 2
worker processes. Each loader runs several full epochs in this process; the figures are medians.
The last line is `ratio: <ours / torchvision>`.

    python bench/loader.py [--data_dir data] [--epochs 5]
"""
import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from cifar10.data import MEAN, STD, Augment, DeviceLoader, load_split

BATCH = 512


class ArrayImages(Dataset):
    "The arrays as a map-style dataset of PIL images, as torchvision's CIFAR10 serves them."
    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = np.ascontiguousarray(images.transpose(0, 2, 3, 1)), labels, transform
    def __len__(self): return len(self.labels)
    def __getitem__(self, i): return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def epoch_rate(loader) -> float:
    "Batches per second over one full pass of `loader`."
    start, batches = time.perf_counter(), 0
    for images, labels in loader: batches += 1
    return batches / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data_dir', default='data')
    parser.add_argument('--epochs', type=int, default=5)
    args = parser.parse_args()
    images, labels = load_split(args.data_dir, 'train')
    torch.set_num_threads(2)

    ours = DeviceLoader(images, labels, BATCH, shuffle=True, drop_last=True,
                        augment=Augment(translate=4, flip='random'))
    torchvision_pipeline = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                               transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    theirs = DataLoader(ArrayImages(images, labels, torchvision_pipeline), BATCH, shuffle=True, drop_last=True,
                        num_workers=2, persistent_workers=True)
    rates = {'cifar10 DeviceLoader': [], 'torchvision DataLoader': []}
    for epoch in range(args.epochs + 1):  # each loader's first epoch warms up (workers, allocator): not counted
        for name, loader in zip(rates, (ours, theirs)):
            rate = epoch_rate(loader)
            if epoch: rates[name].append(rate)
    medians = {name: statistics.median(r) for name, r in rates.items()}
    for name, r in rates.items():
        print(f'{name:24s} {medians[name]:9.1f} batches/s  ({medians[name] * BATCH:9.0f} images/s; epochs: '
              + ', '.join(f'{o:.1f}' for o in r) + ')')
    print(f'ratio: {medians["cifar10 DeviceLoader"] / medians["torchvision DataLoader"]:.1f}')


if __name__ == '__main__':
    main()
