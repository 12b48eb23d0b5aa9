"""Harmonization quality for a fixed training time: a train.py recipe against a paired model and baselines.

    python experiments/quality.py --minutes 10 @recipes/cpu.args
    python experiments/quality.py --minutes 2 5 10 @recipes/cpu.args --ccl_weight 5  # flags after the recipe override it
    python experiments/quality.py --mode unpaired --minutes 10 @recipes/cpu_unpaired.args
    python experiments/quality.py --mode semi --minutes 10 @recipes/cpu_semi_paired.args

--mode paired (the default): for each time budget it trains (train.py --max_minutes) the recipe and a paired-L1
reference (the same flags, but only the original matching loss: no adversarial, cycle or identity term, no
discriminator), harmonizes the held-out test volumes of the demo data with inference_nii.py --reference_dir, and
prints SSIM / PSNR / MAE against the real target-vendor volumes for: the recipe, the paired-L1 reference, the
unharmonized input and histogram matching, and the fine detail of each (inference_nii.py's Detail column) as a ratio
to the real target scan's: 1 = as much fine texture and noise as that vendor's scan, below 1 = smoother.

--mode unpaired and --mode semi split the subjects as dataset/split_demo.py does, into WORK/<mode>/: the last
--traveling subjects (by name) are the test, scanned on both vendors; the others train, the two vendors' subjects
disjoint, except in semi mode the first --pairs, on both vendors. For each time budget it trains the recipe on them,
harmonizes the traveling subjects' SIEMENS scans and prints SSIM / PSNR / MAE against their real Philips scans and the
vendor distance, for the recipe, the unharmonized input, and Nyul standardisation and histogram matching fitted on the
Philips training scans (inference_nii.py --target_dir). In semi mode the reference is a paired model (--paired_recipe)
trained for the same time on the pairs alone (WORK/pairs_only/). There are no pairs to train a paired-L1 model on in
unpaired mode.

The last line printed is one JSON object with the figures.
Any flag this script does not know is passed to train.py.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from collections import namedtuple

import pandas as pd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from dataset.split_demo import PAIRS, TRAVELING, VENDORS, copy_scans, find_scans, plan_split, split_scans
from utils.arguments import parse_arguments
from utils.cli import CliParser
from utils.errors import UserError, run_cli
from utils.evaluation import HARMONIZED, N4_NYUL, NYUL, ORACLE, TARGET_MATCHING, UNHARMONIZED
from utils.paths import check_writable_folder

PAIRED_L1_FLAGS = ['--adv_weight', '0', '--ccl_weight', '0', '--identity_weight', '0',
                   '--warmup_epochs', '0', '--rampup_epochs', '0']
MEASURED = ('SSIM', 'PSNR', 'MAE', 'Detail', 'vendor_distance', 'vendor_classifier', 'NMI', 'tissue_Dice',
            'tissue_difference')
# the flags of one mode only, and the modes that take them
MODE_FLAGS = {'traveling': ('unpaired', 'semi'), 'pairs': ('semi',), 'paired_recipe': ('semi',)}

# Where the harmonized scans are scored: sources, their references on the target vendor and, for the Nyul and
# histogram-matching baselines, target-vendor training scans (or None).
TestScans = namedtuple('TestScans', 'source reference target')
TRAVELING_SOURCE = os.path.join('traveling', VENDORS[0])


def build_parser():
    parser = CliParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--mode', choices=('paired', 'unpaired', 'semi'), default='paired',
                        help='paired: every subject on both vendors; unpaired: the two vendors\' training subjects '
                             'disjoint, the test on --traveling subjects scanned on both; semi: as unpaired, and '
                             '--pairs subjects on both vendors train (dataset/split_demo.py)')
    parser.add_argument('--minutes', type=float, nargs='+', default=[10.0],
                        help='training time budget(s) in minutes of training steps, one run each')
    parser.add_argument('--work_dir', default=os.path.join('results', 'quality'),
                        help='where the demo data, the runs and their outputs go')
    parser.add_argument('--data_dir', default=None,
                        help='folder with SIEMENS/ and Philips/ NIfTI volumes (default: demo data built in --work_dir)')
    parser.add_argument('--subjects', type=int, default=12, help='demo subjects to build when --data_dir is not given')
    parser.add_argument('--name', default='recipe', help='label of the recipe in the table and run folders')
    parser.add_argument('--nominal_cost', type=float, default=None,
                        help='train on a nominal clock (experiments/nominal_clock.py): a paired step counts 0.2 s, a '
                             'CycleGAN step this many times that; repeatable runs, free of timing noise')
    parser.add_argument('--traveling', type=int, default=argparse.SUPPRESS,
                        help='--mode unpaired or semi: subjects held out on both vendors as the test '
                             f'(default {TRAVELING})')
    parser.add_argument('--pairs', type=int, default=argparse.SUPPRESS,
                        help=f'--mode semi: subjects on both vendors in training (default {PAIRS})')
    parser.add_argument('--paired_recipe', default=argparse.SUPPRESS,
                        help='--mode semi: train.py flag file of the paired model trained on the pairs alone '
                             '(default recipes/cpu.args)')
    parser.add_argument('--skip_paired', action='store_true',
                        help='do not train the paired reference (paired-L1; in semi mode the model of the pairs alone)')
    parser.add_argument('--debug', action='store_true', help='show full tracebacks')
    return parser


def run(command, log_path):
    """Run a project script, its output to a log; a failure ends this script with the log's last line."""
    with open(log_path, 'w') as log:
        result = subprocess.run([sys.executable, *command], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        with open(log_path) as f:
            last = [line for line in f.read().replace('\r', '\n').splitlines() if line.strip()][-1:]
        raise UserError(f'{command[0]} failed ({log_path}): {last[0] if last else "no output"}', exit_code=1)


def nifti_folder(args):
    """The folder of SIEMENS/ and Philips/ NIfTI scans: --data_dir, or the demo data, built once in --work_dir."""
    nifti = args.data_dir or os.path.join(args.work_dir, 'nifti')
    if args.data_dir is None and not os.path.exists(os.path.join(nifti, '.complete')):
        run(['dataset/make_demo_data.py', '--output_dir', nifti, '--subjects', str(args.subjects), '--overwrite'],
            os.path.join(args.work_dir, 'make_demo_data.log'))
        open(os.path.join(nifti, '.complete'), 'w').close()
    return nifti


def prepare_data(args):
    """The paired dataset (with held-out test volumes) that every run trains and is measured on, and its test scans."""
    nifti = nifti_folder(args)
    dataset = os.path.join(args.work_dir, 'dataset')
    run(['dataset/generate_paired_dataset.py', '--vendor1_dir', os.path.join(nifti, 'SIEMENS'),
         '--vendor2_dir', os.path.join(nifti, 'Philips'), '--output_dir', dataset, '--split_ratio', '0.8',
         '--test_ratio', '0.2', '--overwrite'], os.path.join(args.work_dir, 'generate_paired_dataset.log'))
    return dataset, TestScans(os.path.join(dataset, 'testset', 'SIEMENS'), os.path.join(dataset, 'testset', 'Philips'),
                              None)


def generate_dataset(folder, output_dir):
    """The dataset of folder's SIEMENS/ and Philips/ scans, written to output_dir/dataset (the log beside it)."""
    dataset = os.path.join(output_dir, 'dataset')
    run(['dataset/generate_paired_dataset.py', '--vendor1_dir', os.path.join(folder, VENDORS[0]),
         '--vendor2_dir', os.path.join(folder, VENDORS[1]), '--output_dir', dataset, '--split_ratio', '0.8',
         '--overwrite'], os.path.join(output_dir, 'generate_paired_dataset.log'))
    return dataset


def prepare_split(args):
    """The subjects split as dataset/split_demo.py splits them (WORK/<mode>/), the dataset of the training scans,
    the traveling subjects' scans to score on, and in semi mode the dataset of the pairs alone (WORK/pairs_only/;
    None otherwise). Returns those and the split."""
    nifti = nifti_folder(args)
    folder = os.path.join(args.work_dir, args.mode)
    split = split_scans(nifti, folder, args.mode, args.traveling, args.pairs, overwrite=True, flag='--data_dir')
    dataset = generate_dataset(folder, args.work_dir)
    test = TestScans(os.path.join(folder, TRAVELING_SOURCE), os.path.join(folder, 'traveling', VENDORS[1]),
                     os.path.join(folder, VENDORS[1]))
    pairs_dataset = None
    if args.mode == 'semi' and not args.skip_paired:
        pairs = os.path.join(args.work_dir, 'pairs_only')
        both = [subject for subject in split[VENDORS[0]] if subject in split[VENDORS[1]]]
        copy_scans(find_scans(nifti, '--data_dir'), dict.fromkeys(VENDORS, both), pairs)
        pairs_dataset = generate_dataset(pairs, pairs)
    return dataset, test, pairs_dataset, split


def train_and_measure(label, flags, minutes, dataset, test, args):
    """Train for `minutes`, harmonize the test volumes (TestScans); returns the mean metrics per method, the wall
    time and train.py's summary.json (optimizer steps, seconds of training steps)."""
    experiment = f'{label}_{minutes:g}min'
    runs = os.path.join(args.work_dir, 'runs')
    os.makedirs(runs, exist_ok=True)
    started = time.perf_counter()
    trainer = ['experiments/nominal_clock.py', str(args.nominal_cost)] if args.nominal_cost else ['train.py']
    run([*trainer, *flags, '-ex', experiment, '--data_root', dataset, '--save_dir', runs,
         '--max_minutes', str(minutes), '--overwrite'], os.path.join(runs, f'{experiment}.train.log'))
    wall = time.perf_counter() - started
    with open(os.path.join(runs, experiment, 'summary.json')) as f:
        summary = json.load(f)
    output = os.path.join(runs, experiment, 'testset', 'SIEMENS_to_Philips')
    target = ['--target_dir', test.target] if test.target else []
    run(['inference_nii.py', '--experiment', experiment, '--save_dir', runs, '--epoch', 'latest',
         '--input_dir', test.source, '--reference_dir', test.reference, *target, '--output_dir', output, '--overwrite'],
        os.path.join(runs, f'{experiment}.inference.log'))
    table = pd.read_csv(os.path.join(output, 'metrics.csv'))
    means = table[table['volume'] == 'mean'].set_index('method')
    return means[[column for column in MEASURED if column in means.columns]], wall, summary


def training_figures(wall, summary):
    """What the table shows of a training run: wall time of train.py, and from its summary.json the optimizer
    steps and the seconds of training steps (--max_minutes counts these: nominal ones with --nominal_cost)."""
    return {'train_wall_s': round(wall, 1), 'steps': summary['steps_this_run'],
            'train_seconds': round(summary['train_seconds'], 1)}


def absolute_flag_files(flags):
    """'@file' flags with the file's absolute path: the scripts run in the repository, not in the caller's folder."""
    return ['@' + os.path.abspath(flag[1:]) if flag.startswith('@') else flag for flag in flags]


def check_mode_flags(args):
    """UserError for a flag of another mode, or a split the subjects cannot give; fills in the defaults."""
    for name, modes in MODE_FLAGS.items():
        if hasattr(args, name) and args.mode not in modes:
            raise UserError(f'--{name} is for --mode {" or ".join(modes)}, not --mode {args.mode}')
    args.traveling = getattr(args, 'traveling', TRAVELING)
    args.pairs = getattr(args, 'pairs', PAIRS)
    args.paired_recipe = os.path.abspath(getattr(args, 'paired_recipe', os.path.join(REPO, 'recipes', 'cpu.args')))
    if args.mode == 'semi' and not os.path.isfile(args.paired_recipe):
        raise UserError(f'--paired_recipe {args.paired_recipe}: no such file; give a train.py flag file such as '
                        'recipes/cpu.args')
    if args.mode != 'paired':
        # the demo's subjects are not built yet: only their number matters here
        subjects = find_scans(args.data_dir, '--data_dir')[VENDORS[0]] if args.data_dir else \
            [str(index) for index in range(args.subjects)]
        plan_split(subjects, args.mode, args.traveling, args.pairs)


def print_table(entry, methods, heading):
    """One line per method of entry (in that order, those it has): SSIM, PSNR, MAE and fine detail, or with a
    target-vendor set the vendor distance."""
    methods = [method for method in methods if method in entry]
    width = max(20, *map(len, methods))
    print(heading)
    for method in methods:
        m = entry[method]
        last = f'{m["vendor_distance"]:.4f}' if 'vendor_distance' in m else f'{m["Detail"]:.2f}'
        for extra in ('vendor_classifier', 'tissue_Dice'):
            last += f'  {m[extra]:.2f}' if extra in m else ''
        print(f'  {method:<{width}} {m["SSIM"]:.4f}  {m["PSNR"]:6.2f}  {m["MAE"]:.4f}  {last}'
              + (f'   ({m["steps"]} steps, trained {m["train_wall_s"]:.0f} s wall)' if 'steps' in m else ''))
    sys.stdout.flush()


def split_arguments(argv):
    """(quality.py's arguments, train.py's flags): the @recipe files first, then the flags quality.py does not know,
    so they override the recipe. The files are pulled out before parsing: argparse would take one that follows
    --minutes for a time budget."""
    flag_files = [token for token in argv if token.startswith('@')]
    args, train_flags = build_parser().parse_known_args([token for token in argv if not token.startswith('@')])
    return args, flag_files + train_flags


def main(argv):
    args, recipe = split_arguments(argv)
    # the scripts run in the repository: paths given relative to here must not change meaning
    args.work_dir = os.path.abspath(args.work_dir)
    args.data_dir = args.data_dir and os.path.abspath(args.data_dir)
    given, recipe = recipe, absolute_flag_files(recipe)
    if any(not m > 0 for m in args.minutes):
        raise UserError('--minutes must be positive')
    if args.nominal_cost is not None and not args.nominal_cost >= 1:
        raise UserError('--nominal_cost must be at least 1 (a CycleGAN step costs more than a paired one)')
    check_mode_flags(args)
    parse_arguments(['-ex', 'check', *recipe])  # an unknown or bad recipe flag stops here, before any training
    pairs_flags = ['@' + args.paired_recipe]
    if args.mode == 'semi' and not args.skip_paired:
        parse_arguments(['-ex', 'check', *pairs_flags])
    check_writable_folder(args.work_dir, '--work_dir')
    paired_flags = recipe + PAIRED_L1_FLAGS
    os.makedirs(args.work_dir, exist_ok=True)
    if args.mode == 'paired':
        dataset, test = prepare_data(args)
        report = {'mode': args.mode}
    else:
        dataset, test, pairs_dataset, split = prepare_split(args)
        report = {'mode': args.mode, 'split': split}

    results = []
    for minutes in args.minutes:
        entry = {'minutes': minutes}
        means, wall, summary = train_and_measure(args.name, recipe, minutes, dataset, test, args)
        entry[args.name] = {**means.loc[HARMONIZED].to_dict(), **training_figures(wall, summary)}
        entry['unharmonized'] = means.loc[UNHARMONIZED].to_dict()
        if args.mode == 'paired':
            entry['histogram_matching'] = means.loc[ORACLE].to_dict()
            if not args.skip_paired:
                means, wall, summary = train_and_measure('paired_l1', paired_flags, minutes, dataset, test, args)
                entry['paired_l1'] = {**means.loc[HARMONIZED].to_dict(), **training_figures(wall, summary)}
            print_table(entry, (args.name, 'paired_l1', 'histogram_matching', 'unharmonized'),
                        f'\n{minutes:g} minutes of training (SSIM / PSNR dB / MAE against the real Philips volumes, '
                        'and fine detail as a ratio to theirs):')
        else:
            entry['Nyul'] = means.loc[NYUL].to_dict()
            entry['N4_Nyul'] = means.loc[N4_NYUL].to_dict()
            entry['histogram_matching_to_target'] = means.loc[TARGET_MATCHING].to_dict()
            if pairs_dataset:
                means, wall, summary = train_and_measure('pairs_only', pairs_flags, minutes, pairs_dataset, test, args)
                entry['pairs_only'] = {**means.loc[HARMONIZED].to_dict(), **training_figures(wall, summary)}
            print_table(entry, (args.name, 'pairs_only', 'Nyul', 'N4_Nyul', 'histogram_matching_to_target',
                                'unharmonized'),
                        f'\n{minutes:g} minutes of training, {args.mode} (SSIM / PSNR dB / MAE against the real '
                        f'Philips scans of the traveling subjects {", ".join(split[TRAVELING_SOURCE])}, the '
                        'distance to the intensities of the Philips training scans, the share of patches the vendor '
                        'classifier calls Philips, and tissue Dice with the input):')
        results.append(entry)
    print(json.dumps({**report, 'recipe_flags': given, 'name': args.name, 'results': results}))


if __name__ == '__main__':
    run_cli(main)
