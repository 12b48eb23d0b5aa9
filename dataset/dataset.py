"""Paired_Dataset: paired vendor slices from `<data_root>/<split>/<subject>/slice_NNN.pkl`.

Each pickle is a dict {vendor1: float32 (H, W, 1) array in [0, 1], vendor2: ...}. Slices of each
subject are ordered by their number and only the range [floor(n*lower), floor(n*upper)) is kept,
which drops the mostly empty slices at both ends of a volume.
"""
import math
import os
import re

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from utils.errors import UserError
from utils.safe_pickle import load_pickle

SLICE_PATTERN = re.compile(r'^slice_(\d+)\.pkl$')
CACHE_LIMIT_BYTES = 4 * 1024 ** 3


def select_slice_range(n, lower_bound, upper_bound):
    """Indices kept of n ordered slices: range(floor(n*lower), floor(n*upper))."""
    return range(math.floor(n * lower_bound), math.floor(n * upper_bound))


def list_subject_slices(subject_dir):
    """Slice pickles of one subject in numeric slice order (slice_2 before slice_10)."""
    numbered = []
    for name in os.listdir(subject_dir):
        match = SLICE_PATTERN.match(name)
        if match:
            numbered.append((int(match.group(1)), os.path.join(subject_dir, name)))
    return [path for _, path in sorted(numbered)]


def check_slice(sample, path, vendor1, vendor2):
    """Validate one unpickled slice pair and return the two (H, W) float32 arrays."""
    if not isinstance(sample, dict):
        raise UserError(f'{path}: holds a {type(sample).__name__}, expected a dict {{vendor: array}}')
    images = []
    for vendor in (vendor1, vendor2):
        if vendor not in sample:
            raise UserError(f'{path}: no {vendor!r} image (keys: {sorted(map(str, sample))}); '
                            'set --vendor1/--vendor2 to the keys of your pickles')
        image = sample[vendor]
        if not isinstance(image, np.ndarray) or image.dtype.kind not in 'fiu':
            raise UserError(f'{path}: {vendor!r} is not a numeric numpy array')
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.ndim != 2 or min(image.shape) < 8:
            raise UserError(f'{path}: {vendor!r} has shape {image.shape}; expected (H, W, 1) with H, W >= 8')
        image = image.astype(np.float32, copy=False)
        if not np.all(np.isfinite(image)):
            raise UserError(f'{path}: {vendor!r} contains NaN or inf; re-create the dataset')
        if image.min() < -1e-3 or image.max() > 1 + 1e-3:
            raise UserError(f'{path}: {vendor!r} has values in [{image.min():.3g}, {image.max():.3g}]; '
                            'slices must be normalised to [0, 1] (use dataset/generate_paired_dataset.py)')
        images.append(np.clip(image, 0, 1))
    if images[0].shape != images[1].shape:
        raise UserError(f'{path}: {vendor1} {images[0].shape} and {vendor2} {images[1].shape} differ in size')
    return images


class Paired_Dataset(Dataset):
    """Paired slices of one split; items are (vendor1, vendor2) tensors of shape (1, H, W) in [-1, 1].

    All slices must share one size. They are read once and kept in memory when they fit
    (under CACHE_LIMIT_BYTES), which keeps data loading off the training step's critical path.
    """

    def __init__(self, data_root, vendor1='SIEMENS', vendor2='Philips', split='trainset',
                 lower_bound=0.1, upper_bound=0.9, cache=None, progress=True):
        self.vendor1, self.vendor2 = vendor1, vendor2
        split_dir = os.path.join(data_root, split)
        if not os.path.isdir(data_root):
            raise UserError(f'--data_root {data_root}: no such folder; create the dataset with '
                            'dataset/generate_paired_dataset.py or point --data_root at it')
        if not os.path.isdir(split_dir):
            raise UserError(f'{split_dir}: no such folder; --data_root must hold trainset/ and evalset/')
        self.paths = []
        for subject in sorted(os.listdir(split_dir)):
            subject_dir = os.path.join(split_dir, subject)
            if os.path.isdir(subject_dir):
                slices = list_subject_slices(subject_dir)
                self.paths += [slices[i] for i in select_slice_range(len(slices), lower_bound, upper_bound)]
        if not self.paths:
            raise UserError(f'{split_dir}: no slice_NNN.pkl files in its subject folders (after '
                            f'--lower_bound {lower_bound} / --upper_bound {upper_bound}); check the dataset')
        first = self._read(self.paths[0])
        self.image_size = first[0].shape
        if cache is None:
            cache = 2 * first[0].nbytes * len(self.paths) <= CACHE_LIMIT_BYTES
        self.cache = None
        if cache:
            stack = np.empty((len(self.paths), 2) + self.image_size, dtype=np.float32)
            for i, path in enumerate(tqdm(self.paths, desc=f'loading {split}', unit='slice',
                                          disable=not progress, leave=False)):
                stack[i] = self._read(path)
            self.cache = torch.from_numpy(stack * 2 - 1)

    def _read(self, path):
        images = check_slice(load_pickle(path), path, self.vendor1, self.vendor2)
        if hasattr(self, 'image_size') and images[0].shape != self.image_size:
            raise UserError(f'{path}: slice size {images[0].shape} differs from {self.image_size} of '
                            f'{self.paths[0]}; regenerate the dataset with --image_size')
        return np.stack(images)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        if self.cache is not None:
            pair = self.cache[index]
        else:
            pair = torch.from_numpy(self._read(self.paths[index]) * 2 - 1)
        return pair[0:1], pair[1:2]
