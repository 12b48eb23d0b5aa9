"""Turn two folders of scans (one per vendor) into the slice pickles train.py reads: pairs and single-vendor slices.

    python dataset/generate_paired_dataset.py --vendor1_dir SIEMENS/ --vendor2_dir Philips/ \
        --output_dir dataset/Harmonization_dataset --split_ratio 0.8 --test_ratio 0.1

Inputs are 3-D NIfTI volumes named by subject (`subj_001.nii.gz`), or 2-D slices (.png, .tif, .npy) in one
sub-folder per subject. A subject in both folders (a traveling subject) is a pair: its two scans must share
one grid after reorientation (or --resample) and their slices are matched voxel for voxel (2-D slices by
file name). A subject in one folder only is a single-vendor subject: its slices feed the unpaired terms.
With --unpaired nothing is paired, even where names match. Each volume is brought to canonical orientation
(and with --voxel_size resampled to that spacing), normalised (utils.volume.normalise) and cut into axial
slices:

    OUTPUT/trainset/<subject>/slice_NNN.pkl   a pair: {vendor1: float32 (H, W, 1) in [0, 1], vendor2: ...}
                                              a single-vendor subject: {vendor: float32 (H, W, 1) in [0, 1]}
    OUTPUT/trainset/<subject>_<vendor>/...    with --unpaired, each scan of a subject in both folders (one key)
    OUTPUT/evalset/...                        the same for the evaluation subjects
    OUTPUT/testset/<vendor>/<subject>.nii.gz  held-out originals, untouched (--test_ratio or --test_subjects)
    OUTPUT/dataset_info.json                  vendors, splits, pairs, slice counts, spacing, normalisation

The split is by subject and reproducible with --seed; the subjects in both folders, those only in vendor 1's
and those only in vendor 2's are each split by the ratios, so every split gets subjects of each kind where
there are enough.
"""
import argparse
import json
import os
import pickle
import random
import shutil
import sys
import warnings

import numpy as np
from tqdm import tqdm

from utils.cli import CliParser
from utils.errors import UserError, run_cli
from utils.paths import check_writable_folder
from utils.anatomy import MaskError, anatomy_mask, anatomy_on_grid, reference_region, require_mask
from utils.volume import (NIFTI_SUFFIXES, natural_key, RESAMPLE_ORDER, ROBUST_PERCENTILE, anatomy_only, axial_slices,
                          check_same_spacing, list_nifti, load_volume, nifti_stem, normalise, pad_or_crop,
                          resample_onto, resample_to_spacing, robust_max, to_canonical, voxel_spacing)

SLICE_SUFFIXES = ('.png', '.tif', '.tiff', '.npy')
SPLITS = ('trainset', 'evalset', 'testset')


def build_parser():
    parser = CliParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--vendor1_dir', required=True, help='scans of vendor 1 (e.g. SIEMENS)')
    parser.add_argument('--vendor2_dir', required=True,
                        help='scans of vendor 2 (e.g. Philips); a subject (file name) in both folders is a pair')
    parser.add_argument('--output_dir', required=True, help='where trainset/, evalset/, testset/ are written')
    parser.add_argument('--vendor1', default='SIEMENS', help='name of vendor 1 (the key in the pickles)')
    parser.add_argument('--vendor2', default='Philips', help='name of vendor 2')
    parser.add_argument('--split_ratio', type=float, default=0.8,
                        help='fraction of the non-test subjects used for training; the rest evaluate')
    parser.add_argument('--test_ratio', type=float, default=0.0,
                        help='fraction of subjects held out as untouched volumes in testset/ for inference; '
                             'subjects in both folders and those in one only are held out each by this fraction; '
                             'with --unpaired they are drawn first from the subjects in both folders, the only ones '
                             'that can be scored against a reference scan')
    parser.add_argument('--test_subjects', nargs='+', metavar='SUBJECT',
                        help='hold out exactly these subjects (file names without .nii/.nii.gz) in testset/; '
                             'replaces --test_ratio')
    parser.add_argument('--unpaired', action='store_true',
                        help='pair nothing: a subject in both folders becomes two single-vendor subjects '
                             '<subject>_<vendor> (test subjects keep their names in testset/)')
    parser.add_argument('--voxel_size', type=float, nargs='+', metavar='MM',
                        help='resample every volume (canonical orientation, trilinear: order '
                             f'{RESAMPLE_ORDER}) to this spacing in mm, one value (isotropic) or three; needed when '
                             'voxel sizes differ between volumes. inference_nii.py then resamples its inputs the '
                             'same way and its outputs back onto each input\'s grid')
    parser.add_argument('--image_size', type=int, nargs=2, metavar=('H', 'W'),
                        help='centre-pad or crop every slice to H x W (needed when subjects differ in size)')
    parser.add_argument('--resample', action='store_true',
                        help='resample vendor 2 onto vendor 1\'s grid when a pair\'s grids differ (else the pair '
                             'is skipped)')
    parser.add_argument('--mask_dir',
                        help='masks of the anatomy (non-zero inside the brain or head), one per scan, named after '
                             'it (subj_001.nii.gz or subj_001_mask.nii.gz), in <mask_dir>/<vendor>/ or in '
                             '<mask_dir>/ itself; without it the anatomy is found in each scan (utils/anatomy.py)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the subject split')
    parser.add_argument('--overwrite', action='store_true', help='replace a dataset already in --output_dir')
    parser.add_argument('--debug', action='store_true', help='show full tracebacks')
    return parser


def find_subjects(folder):
    """{subject: path} for a vendor folder: NIfTI files, or sub-folders of 2-D slices."""
    if not os.path.isdir(folder):
        raise UserError(f'{folder}: no such folder')
    volumes = {nifti_stem(path): path for path in list_nifti(folder)}
    if volumes:
        return volumes, 'nifti'
    subjects = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isdir(path) and any(f.lower().endswith(SLICE_SUFFIXES) for f in os.listdir(path)):
            subjects[name] = path
    if not subjects:
        raise UserError(f'{folder}: no NIfTI volumes ({"/".join(NIFTI_SUFFIXES)}) and no sub-folders of 2-D slices '
                        f'({"/".join(SLICE_SUFFIXES)}); point --vendor1_dir/--vendor2_dir at the scans')
    return subjects, 'slices'


def read_slice_file(path):
    if path.lower().endswith('.npy'):
        image = np.load(path, allow_pickle=False)
    elif path.lower().endswith(('.tif', '.tiff')):
        import tifffile
        image = tifffile.imread(path)
    else:
        from PIL import Image
        with Image.open(path) as picture:
            image = np.asarray(picture.convert('F') if picture.mode not in ('I', 'I;16', 'F') else picture)
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        image = image[..., :3].mean(axis=-1)
    if image.ndim != 2:
        raise UserError(f'{path}: a slice of shape {image.shape}; 2-D images are expected')
    return image


def slice_names(folder):
    return {os.path.splitext(f)[0]: f for f in os.listdir(folder) if f.lower().endswith(SLICE_SUFFIXES)}


def load_slice_folder(folder, stems):
    """The slices of one subject folder with the given file stems, in natural order, as an (X, Y, Z) stack."""
    files = slice_names(folder)
    names = [files[stem] for stem in sorted(stems, key=natural_key)]
    try:
        slices = [read_slice_file(os.path.join(folder, name)) for name in names]
    except UserError:
        raise
    except Exception as error:
        raise UserError(f'{folder}: cannot read its slices ({type(error).__name__}: {error})') from None
    shapes = {s.shape for s in slices}
    if len(shapes) != 1:
        raise UserError(f'{folder}: slices of different sizes {sorted(shapes)}')
    return np.stack(slices, axis=-1), names


def same_grid(a, b):
    voxel = float(np.min(a.header.get_zooms()[:3]))
    return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=1e-3 * max(voxel, 1.0))


def load_pair(subject, path1, path2, kind, resample, vendors, voxel_size=None, mask_dir=None):
    """Both vendors' data of one subject on one grid in canonical orientation, (X, Y, Z) float32 arrays, their
    anatomy masks (utils.anatomy) on that grid, and the grid (an image; None for 2-D slices)."""
    if kind == 'slices':
        stems1, stems2 = set(slice_names(path1)), set(slice_names(path2))
        unmatched = sorted(stems1 ^ stems2, key=natural_key)
        if unmatched:
            tqdm.write(f'subject {subject}: slices without a partner skipped: {", ".join(unmatched[:10])}'
                       + (' ...' if len(unmatched) > 10 else ''), file=sys.stderr)
        if not stems1 & stems2:
            raise UserError(f'subject {subject}: no slice file name is in both {path1} and {path2}')
        (data1, _), (data2, _) = load_slice_folder(path1, stems1 & stems2), load_slice_folder(path2, stems1 & stems2)
        if data1.shape != data2.shape:
            raise UserError(f'subject {subject}: {vendors[0]} slices {data1.shape} and {vendors[1]} slices '
                            f'{data2.shape} differ; the pair must match slice for slice')
        return data1, data2, anatomy_mask(data1, path1), anatomy_mask(data2, path2), None
    image1, image2 = to_canonical(load_volume(path1)), to_canonical(load_volume(path2))
    on_one_grid = same_grid(image1, image2)
    if not on_one_grid and not resample:
        raise UserError(f'subject {subject}: {path1} {image1.shape} and {path2} {image2.shape} are on different '
                        'grids (shape or affine); register them, or pass --resample to resample vendor 2 onto '
                        'vendor 1\'s grid')
    grid = resample_to_spacing(image1, voxel_size) if voxel_size else image1
    data1 = np.asarray(grid.dataobj, dtype=np.float32)
    moved = voxel_size or not on_one_grid
    data2 = np.clip(resample_onto(image2, grid) if moved else np.asarray(image2.dataobj, dtype=np.float32), 0, None)
    mask1 = scan_mask(path1, image1, grid if voxel_size else None, data1, mask_dir, vendors[0])
    mask2 = scan_mask(path2, image2, grid if moved else None, data2, mask_dir, vendors[1])
    return data1, data2, mask1, mask2, grid


def scan_mask(path, image, grid, grid_data, mask_dir, vendor):
    """The anatomy (utils.anatomy.anatomy_on_grid) of the scan `image` (canonical) on `grid` (None: its own), where
    its voxels are `grid_data`: its mask in mask_dir, or found in the scan."""
    mask_path = require_mask(mask_dir, nifti_stem(path), path, vendor) if mask_dir else None
    return anatomy_on_grid(image, path, grid, grid_data, mask_path)


def load_single(path, kind, vendor, voxel_size=None, mask_dir=None):
    """One vendor's data of one subject in canonical orientation, an (X, Y, Z) float32 array, its anatomy mask
    (utils.anatomy) and its grid (an image; None for 2-D slices)."""
    if kind == 'slices':
        data, _ = load_slice_folder(path, slice_names(path))
        return data, anatomy_mask(data, path), None
    image = to_canonical(load_volume(path))
    grid = resample_to_spacing(image, voxel_size) if voxel_size else image
    data = np.asarray(grid.dataobj, dtype=np.float32)
    return data, scan_mask(path, image, None if grid is image else grid, data, mask_dir, vendor), grid


def load_unit(unit, kind, args, vendors):
    """{vendor: canonical (X, Y, Z) float32 data} of one folder to write, {vendor: its anatomy mask} and the grid
    (None for 2-D slices)."""
    if len(unit.sources) == 2:
        data1, data2, mask1, mask2, grid = load_pair(unit.subject, unit.sources[vendors[0]],
                                                     unit.sources[vendors[1]], kind, args.resample, vendors,
                                                     args.voxel_size, args.mask_dir)
        return {vendors[0]: data1, vendors[1]: data2}, {vendors[0]: mask1, vendors[1]: mask2}, grid
    (vendor, path), = unit.sources.items()
    data, mask, grid = load_single(path, kind, vendor, args.voxel_size, args.mask_dir)
    return {vendor: data}, {vendor: mask}, grid


def volume_scale(subject, data, mask, vendor, path):
    """The robust maximum of one scan over its reference region (utils.anatomy), or UserError."""
    scale = robust_max(data, reference_region(data, mask))
    if not scale > 0:
        raise UserError(f'subject {subject}: {path} ({vendor}) has no positive voxels in its anatomy (all zero?); '
                        'remove it')
    return scale


class Unit:
    """One subject folder to write: `folder` under trainset/ or evalset/, the person `subject` it comes from, and
    its scans {vendor: path} (two: a pair)."""

    def __init__(self, subject, folder, sources):
        self.subject, self.folder, self.sources = subject, folder, sources


def plan_units(subjects1, subjects2, vendors, unpaired, folders):
    """The folders to write: a pair per subject in both vendor folders (two single-vendor folders
    <subject>_<vendor> with --unpaired), a single-vendor folder per subject in one only."""
    units = []
    for subject in sorted(set(subjects1) | set(subjects2), key=natural_key):
        sources = {vendor: table[subject] for vendor, table in zip(vendors, (subjects1, subjects2)) if subject in table}
        if len(sources) == 1 or not unpaired:
            units.append(Unit(subject, subject, sources))
            continue
        for vendor, path in sources.items():
            folder = f'{subject}_{vendor}'
            if folder in subjects1 or folder in subjects2:
                where = folders[0] if folder in subjects1 else folders[1]
                raise UserError(f'--unpaired: {subject} of both folders would be written as {folder}, the name of '
                                f'another subject in {where}; rename one of them')
            units.append(Unit(subject, folder, {vendor: path}))
    return units


def split_group(subjects, split_ratio, n_test, seed):
    """Shuffle subjects reproducibly and cut them into train / eval / test lists; the last n_test are the test."""
    order = sorted(subjects)
    random.Random(seed).shuffle(order)
    rest = len(order) - n_test
    n_train = min(max(1, round(rest * split_ratio)), rest - 1) if rest >= 2 else rest
    return {'trainset': order[:n_train], 'evalset': order[n_train:rest], 'testset': order[rest:]}


def held_out_counts(groups, test_ratio, unpaired):
    """How many subjects of each group --test_ratio holds out. At least one in all: from the subjects in both
    folders where there are any. With --unpaired the subjects in both folders are drawn first (only they can be
    scored against a reference), the rest alternately from the two single-vendor groups."""
    sizes = [len(group) for group in groups]
    if test_ratio == 0:
        return [0, 0, 0]
    if not unpaired:
        counts = [round(size * test_ratio) for size in sizes]
        if not any(counts):
            counts[next(i for i, size in enumerate(sizes) if size)] = 1
        return counts
    wanted = max(1, round(sum(sizes) * test_ratio))
    counts = [min(wanted, sizes[0]), 0, 0]
    while sum(counts) < wanted:
        for i in (1, 2):
            if sum(counts) < wanted and counts[i] < sizes[i]:
                counts[i] += 1
    return counts


def split_subjects(usable, vendors, args):
    """{split: [subjects]} by subject: each group (in both vendor folders, only vendor 1's, only vendor 2's)
    split by the ratios on its own, or --test_subjects held out and the rest split by --split_ratio."""
    groups = [[s for s, have in usable.items() if len(have) == 2],
              [s for s, have in usable.items() if have == {vendors[0]}],
              [s for s, have in usable.items() if have == {vendors[1]}]]
    if args.test_subjects:
        held_out = set(args.test_subjects)
        groups = [[s for s in group if s not in held_out] for group in groups]
        counts = [0, 0, 0]
    else:
        held_out = set()
        counts = held_out_counts(groups, args.test_ratio, args.unpaired)
    if not groups[1] and not groups[2] and not args.unpaired and not held_out:
        rest = len(groups[0]) - counts[0]
        if rest < 2:
            fix = 'add subjects or lower --test_ratio' if counts[0] else 'add subjects'
            raise UserError(f'{len(groups[0])} paired subjects leave {rest} for training and evaluation; at least 2 '
                            f'are needed (one each): {fix}')
    splits = {'trainset': [], 'evalset': [], 'testset': sorted(held_out)}
    for group, n_test in zip(groups, counts):
        for split, names in split_group(group, args.split_ratio, n_test, args.seed).items():
            splits[split] += names
    for vendor in vendors:  # groups of one subject all train: move one to evaluation where a vendor has none
        train = [s for s in splits['trainset'] if vendor in usable[s]]
        if len(train) >= 2 and not any(vendor in usable[s] for s in splits['evalset']):
            moved = ([s for s in train if usable[s] == {vendor}] or train)[-1]
            splits['trainset'].remove(moved)
            splits['evalset'].append(moved)
    return {split: sorted(names, key=natural_key) for split, names in splits.items()}


def check_split(splits, usable, vendors, args):
    """Every vendor needs a training and an evaluation subject outside the test set."""
    flag = '--test_subjects' if args.test_subjects else '--test_ratio'
    for vendor in vendors:
        have = {split: [s for s in names if vendor in usable[s]] for split, names in splits.items()}
        if not have['trainset']:
            raise UserError(f'every {vendor} subject ({", ".join(have["testset"])}) is in the test set ({flag}); two '
                            f'must stay out of it (one trains, one evaluates): hold out fewer or add {vendor} scans')
        if not have['evalset']:
            raise UserError(f'no {vendor} subject is left for evaluation: its only non-test subject '
                            f'{have["trainset"][0]} trains; add {vendor} scans'
                            + (f' or hold out fewer ({flag})' if have['testset'] else ''))


def write_slices(folder, volumes, image_size):
    """One pickle {vendor: (H, W, 1) float32} per axial slice of the volumes {vendor: (X, Y, Z)}; returns the
    slice size written."""
    os.makedirs(folder)
    stacks = {vendor: axial_slices(data) for vendor, data in volumes.items()}
    for index in range(len(next(iter(stacks.values())))):
        sample = {}
        for vendor, stack in stacks.items():
            image = stack[index] if image_size is None else pad_or_crop(stack[index], image_size)
            sample[vendor] = np.ascontiguousarray(image[..., None], dtype=np.float32)
        with open(os.path.join(folder, f'slice_{index:03d}.pkl'), 'wb') as f:
            pickle.dump(sample, f, protocol=pickle.HIGHEST_PROTOCOL)
    return tuple(int(v) for v in image.shape)


def check_arguments(args):
    if not 0 < args.split_ratio < 1:
        raise UserError('--split_ratio must be between 0 and 1 (the training fraction, e.g. 0.8)')
    if not 0 <= args.test_ratio < 1:
        raise UserError('--test_ratio must be in [0, 1)')
    if args.image_size is not None and min(args.image_size) < 8:
        raise UserError('--image_size H W must both be at least 8')
    if args.vendor1 == args.vendor2:
        raise UserError('--vendor1 and --vendor2 must differ')
    if args.voxel_size is not None:
        if len(args.voxel_size) not in (1, 3) or not all(np.isfinite(v) and v > 0 for v in args.voxel_size):
            raise UserError(f'--voxel_size {" ".join(map(str, args.voxel_size))}: give one positive spacing in mm '
                            '(isotropic) or three')
        args.voxel_size = tuple(args.voxel_size) * (3 if len(args.voxel_size) == 1 else 1)
    if args.test_subjects:
        args.test_subjects = sorted(set(args.test_subjects), key=natural_key)
        if args.test_ratio > 0:
            print(f'note: --test_subjects given, so --test_ratio {args.test_ratio} is not used', file=sys.stderr)
    output = os.path.realpath(args.output_dir)
    for flag, folder in (('--vendor1_dir', args.vendor1_dir), ('--vendor2_dir', args.vendor2_dir)):
        if output == os.path.realpath(folder) or output.startswith(os.path.realpath(folder) + os.sep):
            raise UserError(f'--output_dir {args.output_dir} lies inside {flag} {folder}; write the dataset elsewhere')
    check_writable_folder(args.output_dir, '--output_dir')
    existing = [name for name in SPLITS + ('dataset_info.json',) if os.path.exists(os.path.join(args.output_dir, name))]
    if existing and not args.overwrite:
        raise UserError(f'{args.output_dir} already holds a dataset ({", ".join(existing)}); choose another '
                        '--output_dir or pass --overwrite to replace it')


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_arguments(args)
    vendors = (args.vendor1, args.vendor2)
    folders = (args.vendor1_dir, args.vendor2_dir)
    subjects1, kind1 = find_subjects(args.vendor1_dir)
    subjects2, kind2 = find_subjects(args.vendor2_dir)
    if kind1 != kind2:
        raise UserError(f'{args.vendor1_dir} holds {kind1} but {args.vendor2_dir} holds {kind2}; use one kind of input')
    if kind1 == 'slices' and args.mask_dir:
        raise UserError('--mask_dir takes NIfTI masks of NIfTI volumes; 2-D slices are masked from the image: leave '
                        'it out')
    if args.mask_dir and not os.path.isdir(args.mask_dir):
        raise UserError(f'--mask_dir {args.mask_dir}: no such folder')
    if kind1 == 'slices' and args.voxel_size:
        raise UserError('--voxel_size resamples NIfTI volumes; 2-D slices carry no voxel size: leave it out')
    for name in args.test_subjects or ():
        if name not in subjects1 and name not in subjects2:
            raise UserError(f'--test_subjects {name}: no such subject in {args.vendor1_dir} or {args.vendor2_dir} '
                            '(give file names without .nii/.nii.gz)')
    for vendor, folder, own, other in zip(vendors, folders, (subjects1, subjects2), (subjects2, subjects1)):
        alone = sorted(set(own) - set(other), key=natural_key)
        if alone:
            print(f'{len(alone)} subject(s) only in {folder}, used as single-vendor {vendor} subjects: '
                  f'{", ".join(alone[:10])}{" ..." if len(alone) > 10 else ""}')
    units = plan_units(subjects1, subjects2, vendors, args.unpaired, folders)

    # Pass 1: read every scan once to check it and collect the normalisation statistics, before writing anything.
    scales, problems, slice_sizes, spacings = {}, [], set(), []
    for unit in tqdm(units, desc='checking scans', unit='subject'):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter('always')
                volumes, masks, grid = load_unit(unit, kind1, args, vendors)
            for warning in caught:
                tqdm.write(f'warning: {warning.message}', file=sys.stderr)
            unit_scales = {vendor: volume_scale(unit.subject, data, masks[vendor], vendor, unit.sources[vendor])
                           for vendor, data in volumes.items()}
        except MaskError:
            raise  # a missing or wrong mask is the user's to fix, not a scan to skip
        except UserError as error:
            problems.append(str(error))
            tqdm.write(f'skipped: {error}', file=sys.stderr)
            continue
        scales[unit.folder] = unit_scales
        slice_sizes.add(tuple(next(iter(volumes.values())).shape[:2]) if args.image_size is None
                        else tuple(args.image_size))
        if grid is not None:
            spacings.append((next(iter(unit.sources.values())), voxel_spacing(grid)))
    units = [unit for unit in units if unit.folder in scales]
    if not units:
        raise UserError(f'none of the {len(scales) + len(problems)} subjects could be used: {"; ".join(problems)}')
    usable = {}  # subject -> the vendors whose scans of it are used
    for unit in units:
        usable.setdefault(unit.subject, set()).update(scales[unit.folder])
    for vendor, flag, folder in zip(vendors, ('--vendor1_dir', '--vendor2_dir'), folders):
        if not any(vendor in have for have in usable.values()):
            raise UserError(f'{flag} {folder}: none of its {vendor} scans could be used (see the skipped lines); '
                            'fix or replace them')
    if spacings and not args.voxel_size:
        check_same_spacing(spacings)
    if len(slice_sizes) > 1:
        raise UserError(f'subjects have different in-plane sizes {sorted(slice_sizes)}; pass --image_size H W '
                        'to pad or crop every slice to one size')
    for name in args.test_subjects or ():
        if name not in usable:
            raise UserError(f'--test_subjects {name}: its scans could not be used (see the skipped lines); fix them '
                            'or leave it out of --test_subjects')
    people = split_subjects(usable, vendors, args)
    check_split(people, usable, vendors, args)
    split_of = {subject: split for split, names in people.items() for subject in names}
    splits = {split: [unit.folder for unit in units if split_of[unit.subject] == split]
              for split in ('trainset', 'evalset')}
    splits['testset'] = people['testset']

    # Pass 2: write into a staging folder, then move into place, so a failure leaves no half dataset.
    os.makedirs(args.output_dir, exist_ok=True)
    staging = os.path.join(args.output_dir, '.generating')
    shutil.rmtree(staging, ignore_errors=True)
    n_slices = {'trainset': 0, 'evalset': 0}
    vendor_slices = {split: {**{vendor: 0 for vendor in vendors}, 'pairs': 0} for split in n_slices}
    try:
        for split in ('trainset', 'evalset'):
            for unit in tqdm([u for u in units if u.folder in splits[split]], desc=f'writing {split}', unit='subject'):
                with warnings.catch_warnings():
                    warnings.simplefilter('ignore')
                    volumes, masks, _ = load_unit(unit, kind1, args, vendors)
                volumes = {vendor: anatomy_only(normalise(data, scales[unit.folder][vendor])[0], masks[vendor])
                           for vendor, data in volumes.items()}
                size = write_slices(os.path.join(staging, split, unit.folder), volumes, args.image_size)
                count = next(iter(volumes.values())).shape[2]
                n_slices[split] += count
                for vendor in volumes:
                    vendor_slices[split][vendor] += count
                vendor_slices[split]['pairs'] += count if len(volumes) == 2 else 0
        for vendor, table in zip(vendors, (subjects1, subjects2)):
            os.makedirs(os.path.join(staging, 'testset', vendor))
            for subject in splits['testset']:
                if vendor not in usable[subject]:
                    continue
                source = table[subject]
                target = os.path.join(staging, 'testset', vendor, os.path.basename(source))
                (shutil.copytree if os.path.isdir(source) else shutil.copy2)(source, target)
        subject_scales = {}
        for unit in units:
            subject_scales.setdefault(unit.subject, {}).update({v: float(s) for v, s in scales[unit.folder].items()})
        vendor_subjects = {vendor: {split: [name for name in names if vendor in (
                           usable[name] if split == 'testset' else scales[name])] for split, names in splits.items()}
                           for vendor in vendors}
        info = {
            'vendors': list(vendors),
            'subjects': splits,
            'slices': n_slices,
            'slice_size': list(size),
            'input_kind': kind1,
            'orientation': 'closest canonical (RAS+); axial slices are the last voxel axis' if kind1 == 'nifti'
                           else 'as stored (2-D slices)',
            'normalisation': {'method': 'robust_max', 'percentile': ROBUST_PERCENTILE, 'clip': [0.0, 1.0],
                              'description': 'each volume divided by the given percentile of its reference '
                                             'region (the brain, or the whole anatomy where no head surrounds '
                                             'it: utils/anatomy.py), clipped to [0, 1], and every voxel outside '
                                             'the anatomy set to 0'},
            'masks': os.path.abspath(args.mask_dir) if args.mask_dir else 'computed from each scan (utils/anatomy.py)',
            'intensity_scale': {vendor: float(np.median([scales[folder][vendor] for folder in
                                                         vendor_subjects[vendor]['trainset']]))
                                for vendor in vendors},
            'subject_scales': subject_scales,
            'sources': {vendors[0]: os.path.abspath(args.vendor1_dir), vendors[1]: os.path.abspath(args.vendor2_dir)},
            'skipped': problems,
            'paired_subjects': sorted((folder for folder in splits['trainset'] + splits['evalset']
                                       if len(scales[folder]) == 2), key=natural_key),
            'vendor_subjects': vendor_subjects,
            'vendor_slices': vendor_slices,
            'unpaired': args.unpaired,
            'voxel_size': list(args.voxel_size) if args.voxel_size else None,
        }
        with open(os.path.join(staging, 'dataset_info.json'), 'w') as f:
            json.dump(info, f, indent=2)
        for name in SPLITS + ('dataset_info.json',):
            target = os.path.join(args.output_dir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            elif os.path.exists(target):
                os.remove(target)
            if os.path.exists(os.path.join(staging, name)):
                os.replace(os.path.join(staging, name), target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    print(f'wrote {args.output_dir}: {len(splits["trainset"])} train subjects ({n_slices["trainset"]} slices), '
          f'{len(splits["evalset"])} eval ({n_slices["evalset"]} slices), {len(splits["testset"])} test subjects in '
          f'testset/; slices {size[0]}x{size[1]}; {len(problems)} skipped; '
          f'statistics in {os.path.join(args.output_dir, "dataset_info.json")}')
    if any(len(have) == 1 for have in scales.values()):
        for split in ('trainset', 'evalset'):
            counts = vendor_slices[split]
            print(f'{split}: {counts["pairs"]} paired slices; '
                  + ', '.join(f'{counts[v] - counts["pairs"]} {v}-only' for v in vendors))


if __name__ == '__main__':
    run_cli(main)
