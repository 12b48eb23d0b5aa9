"""Paired_Dataset: vendor slices from `<data_root>/<split>/<subject>/slice_NNN.pkl`, paired or not.

A pickle is a dict {vendor1: float32 (H, W, 1) array in [0, 1], vendor2: ...} for a slice of a subject scanned
on both vendors (a pair), or a one-key dict {vendor: array} for a single-vendor subject. Slices of each subject
are ordered by their number and only the range [floor(n*lower), floor(n*upper)) is kept, which drops the mostly
empty slices at both ends of a volume.

On all-paired data an item is a pair, as in the seed. Otherwise the two vendors' slices form two pools drawn
independently (VendorDraws): an item then also carries, for each of its two slices, the other vendor's slice of
the same subject and position where there is one, which is what the original-matching term compares against.
"""
import math
import os
import re

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
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


def slice_vendors(sample, path, vendor1, vendor2):
    """The vendors a slice holds, in (vendor1, vendor2) order: both for a pair, one for a single-vendor slice."""
    if not isinstance(sample, dict):
        raise UserError(f'{path}: holds a {type(sample).__name__}, expected a dict {{vendor: array}}')
    present = tuple(v for v in (vendor1, vendor2) if v in sample)
    if not present:
        raise UserError(f'{path}: no {vendor1!r} or {vendor2!r} image (keys: {sorted(map(str, sample))}); '
                        'set --vendor1/--vendor2 to the keys of your pickles')
    return present


def check_image(sample, vendor, path):
    """One vendor's image of an unpickled slice as a validated (H, W) float32 array in [0, 1]."""
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
    return np.clip(image, 0, 1)


def check_slice(sample, path, vendor1, vendor2, vendors=None):
    """Validate one unpickled slice; returns its images in (vendor1, vendor2) order, None for a missing vendor.

    `vendors`: the vendors this slice must hold (those of its subject's first slice); default both.
    """
    vendors = vendors or (vendor1, vendor2)
    present = slice_vendors(sample, path, vendor1, vendor2)
    missing = [v for v in vendors if v not in present]
    if missing:
        raise UserError(f'{path}: no {missing[0]!r} image (keys: {sorted(map(str, sample))}), but the other slices of '
                        'this subject have one; set --vendor1/--vendor2 to the keys of your pickles or re-create the '
                        'dataset')
    images = [check_image(sample, v, path) if v in vendors else None for v in (vendor1, vendor2)]
    shapes = {image.shape for image in images if image is not None}
    if len(shapes) > 1:
        raise UserError(f'{path}: {vendor1} {images[0].shape} and {vendor2} {images[1].shape} differ in size')
    return images


class Paired_Dataset(Dataset):
    """The slices of one split; images are (1, H, W) tensors in [-1, 1].

    `paths[i]` is slice i, `vendors[i]` the vendors it holds and `depths[i]` its position in its subject's
    stack of axial slices (0 the first, 1 the last). `pool[v]` lists the slices holding vendor v (a
    vendor's pool), `partner[v][k]` the position in the other vendor's pool of the same slice, or -1 for a
    single-vendor slice. `all_paired`: every slice is a pair; items are then (vendor1, vendor2) pairs and
    len() is the number of slices, as in the seed. Otherwise items are indexed by (k1, k2), a position in each
    pool (see VendorDraws), and len() is the larger pool's size.

    All slices must share one size. They are read once and kept in memory when they fit (under
    CACHE_LIMIT_BYTES), which keeps data loading off the training step's critical path.
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
        self.paths, self.vendors, self.depths = [], [], []
        for subject in sorted(os.listdir(split_dir)):
            subject_dir = os.path.join(split_dir, subject)
            if not os.path.isdir(subject_dir):
                continue
            slices = list_subject_slices(subject_dir)
            kept_range = select_slice_range(len(slices), lower_bound, upper_bound)
            kept = [slices[i] for i in kept_range]
            if kept:
                vendors = slice_vendors(load_pickle(kept[0]), kept[0], vendor1, vendor2)
                last_vendors = slice_vendors(load_pickle(kept[-1]), kept[-1], vendor1, vendor2)
                if last_vendors != vendors:
                    raise UserError(f'{kept[0]} holds {"/".join(vendors)} but {kept[-1]} of the same subject holds '
                                    f'{"/".join(last_vendors)}; a subject\'s slices must all be pairs or all of one '
                                    'vendor: re-create the dataset with dataset/generate_paired_dataset.py')
                self.paths += kept
                self.depths += [(i + 0.5) / len(slices) for i in kept_range]  # position in the subject, 0 to 1
                self.vendors += [vendors] * len(kept)
        if not self.paths:
            raise UserError(f'{split_dir}: no slice_NNN.pkl files in its subject folders (after '
                            f'--lower_bound {lower_bound} / --upper_bound {upper_bound}); check the dataset')
        self.pool = {v: [i for i, vendors in enumerate(self.vendors) if v in vendors] for v in (vendor1, vendor2)}
        for vendor, pool in self.pool.items():
            if not pool:
                raise UserError(f'{split_dir}: no {vendor} slice (every pickle lacks the {vendor!r} key); both vendors '
                                'need slices in trainset/ and evalset/: add subjects of that vendor or check '
                                '--vendor1/--vendor2')
        self.partner = {}
        for vendor, other in ((vendor1, vendor2), (vendor2, vendor1)):
            position = {slice_index: k for k, slice_index in enumerate(self.pool[other])}
            self.partner[vendor] = torch.tensor([position.get(i, -1) if len(self.vendors[i]) == 2 else -1
                                                 for i in self.pool[vendor]], dtype=torch.long)
        self.all_paired = all(len(vendors) == 2 for vendors in self.vendors)
        self.n_pairs = sum(len(vendors) == 2 for vendors in self.vendors)
        first = [image for image in self._read(0) if image is not None][0]
        self.image_size = first.shape
        if cache is None:
            cache = 2 * first.nbytes * len(self.paths) <= CACHE_LIMIT_BYTES
        self.cache = None
        if cache:
            stack = np.zeros((len(self.paths), 2) + self.image_size, dtype=np.float32)
            for i in tqdm(range(len(self.paths)), desc=f'loading {split}', unit='slice', disable=not progress,
                          leave=False):
                stack[i] = self._read_stack(i)
            self.cache = torch.from_numpy(stack * 2 - 1)

    def _read(self, index):
        path = self.paths[index]
        images = check_slice(load_pickle(path), path, self.vendor1, self.vendor2, self.vendors[index])
        size = next(image.shape for image in images if image is not None)
        if hasattr(self, 'image_size') and size != self.image_size:
            raise UserError(f'{path}: slice size {size} differs from {self.image_size} of '
                            f'{self.paths[0]}; regenerate the dataset with --image_size')
        return images

    def _read_stack(self, index):
        """(2, H, W) in [0, 1]: vendor1's and vendor2's image, zeros for a vendor the slice lacks."""
        return np.stack([np.zeros(self.image_size, np.float32) if image is None else image
                         for image in self._read(index)])

    def _slice(self, index):
        if self.cache is not None:
            return self.cache[index]
        return torch.from_numpy(self._read_stack(index) * 2 - 1)

    def _image(self, vendor, position):
        """The `position`-th slice of a vendor's pool as (1, H, W) in [-1, 1]."""
        channel = 0 if vendor == self.vendor1 else 1
        return self._slice(self.pool[vendor][position])[channel:channel + 1]

    def foreground_values(self, vendor, max_slices=2000):
        """The foreground intensities (above the background's -1) of a vendor's slices, in [-1, 1]: of every slice
        of its pool, or of max_slices spread evenly over it."""
        pool = self.pool[vendor]
        positions = np.linspace(0, len(pool) - 1, min(len(pool), max_slices)).round().astype(int)
        images = torch.stack([self._image(vendor, int(position)) for position in np.unique(positions)])
        return images[images > -1]

    def __len__(self):
        if self.all_paired:
            return len(self.paths)
        return max(len(pool) for pool in self.pool.values())

    def __getitem__(self, index):
        if self.all_paired:
            pair = self._slice(index)
            return pair[0:1], pair[1:2]
        position_A, position_B = index
        a, b = self.vendor1, self.vendor2
        real_A, real_B = self._image(a, position_A), self._image(b, position_B)
        partner_of_A, partner_of_B = int(self.partner[a][position_A]), int(self.partner[b][position_B])
        # The other vendor's scan of the same slice (zeros where there is none, masked out of the matching term).
        target_B = self._image(b, partner_of_A) if partner_of_A >= 0 else torch.zeros_like(real_B)
        target_A = self._image(a, partner_of_B) if partner_of_B >= 0 else torch.zeros_like(real_A)
        return real_A, real_B, target_B, torch.tensor(partner_of_A >= 0), target_A, torch.tensor(partner_of_B >= 0)


class VendorDraws(Sampler):
    """Items (k1, k2) of a Paired_Dataset that is not all paired: each vendor's pool shuffled on its own, the
    smaller pool repeated (reshuffled) until the larger one has been gone through once: one epoch.

    The order depends only on (seed, epoch), so a resumed run and every torchrun process draw the same; each
    process takes every world_size-th item (the epoch cut to a multiple of world_size, so all take the same
    number of steps). shuffle=False walks both pools in order (evaluation).

    pairs: (k1, k2) positions of the slices scanned on both vendors; with pair_share, that share of each epoch's
    items (chosen at random) is replaced by such pairs, every pair in turn, so that the matching term, which only
    pairs feed, sees them more often than their share of the pools.
    """

    def __init__(self, pool_sizes, seed=0, rank=0, world_size=1, shuffle=True, pool_depths=None, pairs=None,
                 pair_share=None):
        self.pool_sizes, self.seed, self.rank, self.world_size, self.shuffle = pool_sizes, seed, rank, world_size, shuffle
        self.pairs = torch.as_tensor(pairs or [], dtype=torch.long).reshape(-1, 2)
        self.pair_share = pair_share
        self.pool_depths = None if pool_depths is None else [torch.as_tensor(d, dtype=torch.float64)
                                                             for d in pool_depths]
        self.epoch = 0
        self.length = max(pool_sizes) // world_size

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _order(self, size, total, generator):
        parts, have = [], 0
        while have < total:
            parts.append(torch.randperm(size, generator=generator) if self.shuffle else torch.arange(size))
            have += size
        return torch.cat(parts)[:total]

    def _match_depths(self, order, larger, generator):
        """For each slice of the larger pool in `order`, a random slice of the other pool among those nearest to
        it in depth (the 4% of that pool nearest to it)."""
        smaller = 1 - larger
        depths, other = self.pool_depths[larger][order], self.pool_depths[smaller]
        by_depth = torch.argsort(other)
        candidates = max(1, round(len(other) * 0.02))  # about 2% of a subject's height above and below
        centre = torch.searchsorted(other[by_depth].contiguous(), depths.contiguous())
        offset = torch.randint(-candidates, candidates + 1, (len(order),), generator=generator)
        return by_depth[(centre + offset).clamp(0, len(other) - 1)]

    def items(self):
        """This process's (k1, k2) items of the current epoch, in order."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        total = max(self.pool_sizes)
        if self.pool_depths is not None:
            larger = int(self.pool_sizes[1] > self.pool_sizes[0])
            order = self._order(self.pool_sizes[larger], total, generator)
            matched = self._match_depths(order, larger, generator)
            order_A, order_B = (order, matched) if larger == 0 else (matched, order)
        else:
            order_A, order_B = (self._order(size, total, generator) for size in self.pool_sizes)
        if self.pair_share and len(self.pairs):
            count = round(total * self.pair_share)
            where = torch.randperm(total, generator=generator)[:count]
            chosen = self.pairs[self._order(len(self.pairs), count, generator)]
            order_A[where], order_B[where] = chosen[:, 0], chosen[:, 1]
        indices = list(zip(order_A.tolist(), order_B.tolist()))
        return indices[self.rank:self.length * self.world_size:self.world_size]

    def __iter__(self):
        return iter(self.items())

    def __len__(self):
        return self.length
