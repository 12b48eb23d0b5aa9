"""Turn two folders of scans of the same subjects (one per vendor) into the paired slice pickles train.py reads.

    python dataset/generate_paired_dataset.py --vendor1_dir SIEMENS/ --vendor2_dir Philips/ \
        --output_dir dataset/Harmonization_dataset --split_ratio 0.8 --test_ratio 0.1

Inputs are 3-D NIfTI volumes paired by file name (`subj_001.nii.gz` in both folders), or 2-D slices
(.png, .tif, .npy) in one sub-folder per subject, paired by sub-folder and file name. Each pair is brought
to canonical orientation, checked to share one grid, normalised (utils.volume.normalise), and cut into
axial slices:

    OUTPUT/trainset/<subject>/slice_NNN.pkl   {vendor1: float32 (H, W, 1) in [0, 1], vendor2: ...}
    OUTPUT/evalset/<subject>/slice_NNN.pkl
    OUTPUT/testset/<vendor>/<subject>.nii.gz  (held-out originals, untouched, with --test_ratio)
    OUTPUT/dataset_info.json                  (vendors, splits, slice size, normalisation statistics)
"""
import argparse
import json
import os
import pickle
import random
import re
import shutil
import sys
import warnings

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to
from tqdm import tqdm

from utils.cli import CliParser
from utils.errors import UserError, run_cli
from utils.paths import check_writable_folder
from utils.volume import (NIFTI_SUFFIXES, ROBUST_PERCENTILE, axial_slices, list_nifti, load_volume,
                          nifti_stem, normalise, pad_or_crop, robust_max, to_canonical)

SLICE_SUFFIXES = ('.png', '.tif', '.tiff', '.npy')
SPLITS = ('trainset', 'evalset', 'testset')


def build_parser():
    parser = CliParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--vendor1_dir', required=True, help='scans of vendor 1 (e.g. SIEMENS)')
    parser.add_argument('--vendor2_dir', required=True, help='scans of vendor 2 (e.g. Philips), same subjects')
    parser.add_argument('--output_dir', required=True, help='where trainset/, evalset/, testset/ are written')
    parser.add_argument('--vendor1', default='SIEMENS', help='name of vendor 1 (the key in the pickles)')
    parser.add_argument('--vendor2', default='Philips', help='name of vendor 2')
    parser.add_argument('--split_ratio', type=float, default=0.8,
                        help='fraction of the non-test subjects used for training; the rest evaluate')
    parser.add_argument('--test_ratio', type=float, default=0.0,
                        help='fraction of subjects held out as untouched volumes in testset/ for inference')
    parser.add_argument('--image_size', type=int, nargs=2, metavar=('H', 'W'),
                        help='centre-pad or crop every slice to H x W (needed when subjects differ in size)')
    parser.add_argument('--resample', action='store_true',
                        help='resample vendor 2 onto vendor 1\'s grid when a pair\'s grids differ (else an error)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the subject split')
    parser.add_argument('--overwrite', action='store_true', help='replace a dataset already in --output_dir')
    parser.add_argument('--debug', action='store_true', help='show full tracebacks')
    return parser


def natural_key(text):
    """'slice_10' sorts after 'slice_2'."""
    return [int(part) if part.isdigit() else part for part in re.split(r'(\d+)', text)]


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


def load_pair(subject, path1, path2, kind, resample, vendors):
    """Both vendors' data of one subject on one grid in canonical orientation, (X, Y, Z) float32 arrays."""
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
        return data1, data2, None
    image1, image2 = to_canonical(load_volume(path1)), to_canonical(load_volume(path2))
    if not same_grid(image1, image2):
        if not resample:
            raise UserError(f'subject {subject}: {path1} {image1.shape} and {path2} {image2.shape} are on different '
                            'grids (shape or affine); register them, or pass --resample to resample vendor 2 onto '
                            'vendor 1\'s grid')
        image2 = resample_from_to(image2, image1, order=1)
    data1 = np.asarray(image1.dataobj, dtype=np.float32)
    data2 = np.clip(np.asarray(image2.dataobj, dtype=np.float32), 0, None)
    return data1, data2, image1


def check_subject(subject, data, vendor, path):
    if robust_max(data) <= 0:
        raise UserError(f'subject {subject}: {path} ({vendor}) has no positive voxels (all zero?); remove it')


def split_subjects(subjects, split_ratio, test_ratio, seed):
    """Shuffle subjects reproducibly and cut them into train / eval / test lists (by subject)."""
    order = sorted(subjects)
    random.Random(seed).shuffle(order)
    n_test = round(len(order) * test_ratio)
    if test_ratio > 0:
        n_test = max(1, n_test)
    rest = len(order) - n_test
    n_train = min(max(1, round(rest * split_ratio)), rest - 1)
    if rest < 2:
        raise UserError(f'{len(order)} paired subjects leave {rest} for training and evaluation; at least 2 are '
                        'needed (one each): add subjects or lower --test_ratio')
    return {'trainset': sorted(order[:n_train], key=natural_key),
            'evalset': sorted(order[n_train:rest], key=natural_key),
            'testset': sorted(order[rest:], key=natural_key)}


def write_slices(folder, data1, data2, vendors, image_size):
    """One pickle per axial slice; returns the slice size written."""
    os.makedirs(folder)
    for index, (s1, s2) in enumerate(zip(axial_slices(data1), axial_slices(data2))):
        if image_size is not None:
            s1, s2 = pad_or_crop(s1, image_size), pad_or_crop(s2, image_size)
        with open(os.path.join(folder, f'slice_{index:03d}.pkl'), 'wb') as f:
            pickle.dump({vendors[0]: np.ascontiguousarray(s1[..., None], dtype=np.float32),
                         vendors[1]: np.ascontiguousarray(s2[..., None], dtype=np.float32)}, f,
                        protocol=pickle.HIGHEST_PROTOCOL)
    return tuple(int(v) for v in s1.shape)


def check_arguments(args):
    if not 0 < args.split_ratio < 1:
        raise UserError('--split_ratio must be between 0 and 1 (the training fraction, e.g. 0.8)')
    if not 0 <= args.test_ratio < 1:
        raise UserError('--test_ratio must be in [0, 1)')
    if args.image_size is not None and min(args.image_size) < 8:
        raise UserError('--image_size H W must both be at least 8')
    if args.vendor1 == args.vendor2:
        raise UserError('--vendor1 and --vendor2 must differ')
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
    subjects1, kind1 = find_subjects(args.vendor1_dir)
    subjects2, kind2 = find_subjects(args.vendor2_dir)
    if kind1 != kind2:
        raise UserError(f'{args.vendor1_dir} holds {kind1} but {args.vendor2_dir} holds {kind2}; use one kind of input')
    paired = sorted(set(subjects1) & set(subjects2), key=natural_key)
    unpaired = sorted(set(subjects1) ^ set(subjects2), key=natural_key)
    for name in unpaired:
        side = args.vendor1_dir if name in subjects1 else args.vendor2_dir
        print(f'skipped {name}: only in {side}, no partner in the other vendor folder', file=sys.stderr)
    if not paired:
        raise UserError(f'no subject is in both {args.vendor1_dir} and {args.vendor2_dir} (pairs are matched by '
                        'file name, e.g. subj_001.nii.gz in both); rename the files so the pairs match')

    # Pass 1: read every pair once to check it and collect the normalisation statistics, before writing anything.
    scales, problems, slice_sizes = {}, [], set()
    for subject in tqdm(paired, desc='checking pairs', unit='subject'):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter('always')
                data1, data2, _ = load_pair(subject, subjects1[subject], subjects2[subject], kind1,
                                            args.resample, vendors)
            for warning in caught:
                tqdm.write(f'warning: {warning.message}', file=sys.stderr)
            check_subject(subject, data1, vendors[0], subjects1[subject])
            check_subject(subject, data2, vendors[1], subjects2[subject])
        except UserError as error:
            problems.append(str(error))
            tqdm.write(f'skipped: {error}', file=sys.stderr)
            continue
        scales[subject] = (robust_max(data1), robust_max(data2))
        slice_sizes.add(tuple(data1.shape[:2]) if args.image_size is None else tuple(args.image_size))
    if not scales:
        raise UserError(f'none of the {len(paired)} pairs could be used: {"; ".join(problems)}')
    if len(slice_sizes) > 1:
        raise UserError(f'subjects have different in-plane sizes {sorted(slice_sizes)}; pass --image_size H W '
                        'to pad or crop every slice to one size')
    splits = split_subjects(list(scales), args.split_ratio, args.test_ratio, args.seed)

    # Pass 2: write into a staging folder, then move into place, so a failure leaves no half dataset.
    os.makedirs(args.output_dir, exist_ok=True)
    staging = os.path.join(args.output_dir, '.generating')
    shutil.rmtree(staging, ignore_errors=True)
    n_slices = {'trainset': 0, 'evalset': 0}
    try:
        for split in ('trainset', 'evalset'):
            for subject in tqdm(splits[split], desc=f'writing {split}', unit='subject'):
                with warnings.catch_warnings():
                    warnings.simplefilter('ignore')
                    data1, data2, _ = load_pair(subject, subjects1[subject], subjects2[subject], kind1,
                                                args.resample, vendors)
                data1, _ = normalise(data1, scales[subject][0])
                data2, _ = normalise(data2, scales[subject][1])
                size = write_slices(os.path.join(staging, split, subject), data1, data2, vendors, args.image_size)
                n_slices[split] += data1.shape[2]
        for vendor, table in zip(vendors, (subjects1, subjects2)):
            os.makedirs(os.path.join(staging, 'testset', vendor))
            for subject in splits['testset']:
                source = table[subject]
                target = os.path.join(staging, 'testset', vendor, os.path.basename(source))
                (shutil.copytree if os.path.isdir(source) else shutil.copy2)(source, target)
        train_scales = [scales[s] for s in splits['trainset']]
        info = {
            'vendors': list(vendors),
            'subjects': splits,
            'slices': n_slices,
            'slice_size': list(size),
            'input_kind': kind1,
            'orientation': 'closest canonical (RAS+); axial slices are the last voxel axis' if kind1 == 'nifti'
                           else 'as stored (2-D slices)',
            'normalisation': {'method': 'robust_max', 'percentile': ROBUST_PERCENTILE, 'clip': [0.0, 1.0],
                              'description': 'each volume divided by the given percentile of its non-zero '
                                             'voxels, then clipped to [0, 1]'},
            'intensity_scale': {vendor: float(np.median([s[i] for s in train_scales]))
                                for i, vendor in enumerate(vendors)},
            'subject_scales': {subject: dict(zip(vendors, map(float, scales[subject]))) for subject in scales},
            'sources': {vendors[0]: os.path.abspath(args.vendor1_dir), vendors[1]: os.path.abspath(args.vendor2_dir)},
            'skipped': unpaired + problems,
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
          f'{len(splits["evalset"])} eval ({n_slices["evalset"]} slices), {len(splits["testset"])} test volumes per '
          f'vendor in testset/; slices {size[0]}x{size[1]}; {len(unpaired) + len(problems)} skipped; '
          f'statistics in {os.path.join(args.output_dir, "dataset_info.json")}')


if __name__ == '__main__':
    run_cli(main)
