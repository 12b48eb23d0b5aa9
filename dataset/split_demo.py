"""Split scans of subjects scanned on both vendors as a study without (many) traveling subjects has them: the two
vendors' training subjects disjoint, a few subjects scanned on both held out as the test.

    python dataset/split_demo.py --mode unpaired --input_dir demo/nifti --output_dir demo/unpaired
    python dataset/split_demo.py --mode semi --pairs 2 --input_dir demo/nifti --output_dir demo/semi

INPUT holds SIEMENS/ and Philips/ NIfTI volumes with the same subject names (as dataset/make_demo_data.py writes
them). The subjects, sorted by name: the last --traveling are the test, both their scans copied to
OUTPUT/traveling/SIEMENS and OUTPUT/traveling/Philips. With --mode semi the first --pairs of the others are traveling
subjects that train: both their scans go to OUTPUT/SIEMENS and OUTPUT/Philips. The remaining subjects are cut in
half (the first half the larger): the first half's SIEMENS scans go to OUTPUT/SIEMENS, the second half's Philips
scans to OUTPUT/Philips. Then train on them and score on the traveling subjects:

    python dataset/generate_paired_dataset.py --vendor1_dir OUTPUT/SIEMENS --vendor2_dir OUTPUT/Philips ...
    python inference_nii.py ... --input_dir OUTPUT/traveling/SIEMENS --reference_dir OUTPUT/traveling/Philips \\
        --target_dir OUTPUT/Philips
"""
import argparse
import os
import shutil

from utils.cli import CliParser
from utils.errors import UserError, run_cli
from utils.paths import check_writable_folder
from utils.volume import list_nifti, natural_key, nifti_stem

VENDORS = ('SIEMENS', 'Philips')
MODES = ('unpaired', 'semi')
TRAVELING = 2
PAIRS = 2


def build_parser():
    parser = CliParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--mode', choices=MODES, required=True,
                        help='unpaired: no subject on both vendors in training; semi: --pairs of them')
    parser.add_argument('--input_dir', required=True,
                        help='folder with SIEMENS/ and Philips/ holding the same subjects')
    parser.add_argument('--output_dir', required=True,
                        help='where SIEMENS/, Philips/ and traveling/{SIEMENS,Philips}/ are written')
    parser.add_argument('--traveling', type=int, default=TRAVELING, help='subjects held out on both vendors: the test')
    parser.add_argument('--pairs', type=int, default=argparse.SUPPRESS,
                        help=f'--mode semi: subjects on both vendors in training (default {PAIRS})')
    parser.add_argument('--overwrite', action='store_true', help='replace the folders of an earlier split')
    parser.add_argument('--debug', action='store_true', help='show full tracebacks')
    return parser


def plan_split(subjects, mode, traveling=TRAVELING, pairs=PAIRS):
    """{folder under OUTPUT: [subjects whose scan of that folder's vendor it gets]} (see the module docstring)."""
    if traveling < 1:
        raise UserError(f'--traveling {traveling}: at least one subject must be held out on both vendors as the test')
    if mode == 'semi' and pairs < 1:
        raise UserError(f'--pairs {pairs}: --mode semi needs at least one subject on both vendors in training '
                        '(with none, use --mode unpaired)')
    pairs = pairs if mode == 'semi' else 0
    order = sorted(subjects, key=natural_key)
    single = len(order) - traveling - pairs
    if single < 2:
        flags = f'--traveling {traveling}' + (f' and --pairs {pairs}' if mode == 'semi' else '')
        raise UserError(f'{flags} leave{"" if mode == "semi" else "s"} {max(single, 0)} of the {len(order)} subjects '
                        'for single-vendor training; one per vendor is needed: lower them or add subjects')
    paired, rest, test = order[:pairs], order[pairs:pairs + single], order[pairs + single:]
    half = (single + 1) // 2
    return {VENDORS[0]: paired + rest[:half], VENDORS[1]: paired + rest[half:],
            os.path.join('traveling', VENDORS[0]): test, os.path.join('traveling', VENDORS[1]): test}


def find_scans(input_dir, flag='--input_dir'):
    """{vendor: {subject: path}} of input_dir's vendor folders, or UserError unless both hold the same subjects."""
    scans = {}
    for vendor in VENDORS:
        folder = os.path.join(input_dir, vendor)
        if not os.path.isdir(folder):
            raise UserError(f'{flag} {input_dir} has no {vendor}/ folder; give the folder holding {VENDORS[0]}/ and '
                            f'{VENDORS[1]}/ (as dataset/make_demo_data.py writes them)')
        scans[vendor] = {nifti_stem(path): path for path in list_nifti(folder)}
    for vendor, other in (VENDORS, VENDORS[::-1]):
        alone = sorted(set(scans[vendor]) - set(scans[other]), key=natural_key)
        if alone:
            raise UserError(f'{flag} {input_dir}: {alone[0]} is in {vendor}/ but not in {other}/; every subject must '
                            'be scanned on both vendors (the split chooses which scans train)')
    return scans


def inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


def split_scans(input_dir, output_dir, mode, traveling=TRAVELING, pairs=PAIRS, overwrite=False, flag='--input_dir'):
    """Copy input_dir's scans into output_dir's four folders as plan_split says; returns the plan. Everything is
    checked before a file is removed or copied."""
    scans = find_scans(input_dir, flag)
    plan = plan_split(scans[VENDORS[0]], mode, traveling, pairs)
    targets = {folder: os.path.join(output_dir, folder) for folder in plan}
    for vendor in VENDORS:
        for target in targets.values():
            if inside(target, os.path.join(input_dir, vendor)) or inside(os.path.join(input_dir, vendor), target):
                raise UserError(f'--output_dir {output_dir} would hold the split in {flag} {input_dir}\'s own '
                                'folders; write it elsewhere')
    check_writable_folder(output_dir, '--output_dir')
    earlier = [folder for folder, target in targets.items() if os.path.exists(target)]
    if earlier and not overwrite:
        raise UserError(f'{output_dir} already holds {", ".join(earlier)}; choose another --output_dir or pass '
                        '--overwrite to replace them')
    copy_scans(scans, plan, output_dir)
    return plan


def copy_scans(scans, plan, output_dir):
    """Copy the scans ({vendor: {subject: path}}) of each folder's subjects in the plan into output_dir/folder,
    replacing that folder; a folder's vendor is its last part."""
    for folder, subjects in plan.items():
        target = os.path.join(output_dir, folder)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.makedirs(target)
        for subject in subjects:
            shutil.copy2(scans[os.path.basename(folder)][subject], target)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if hasattr(args, 'pairs') and args.mode != 'semi':
        raise UserError(f'--pairs is for --mode semi; --mode {args.mode} trains on no subject of both vendors')
    plan = split_scans(args.input_dir, args.output_dir, args.mode, args.traveling, getattr(args, 'pairs', PAIRS),
                       args.overwrite)
    for folder, subjects in plan.items():
        print(f'{os.path.join(args.output_dir, folder)}: {", ".join(subjects)}')


if __name__ == '__main__':
    run_cli(main)
