"""Harmonization quality for a fixed training time: a train.py recipe against a paired-L1 model and baselines.

    python experiments/quality.py --minutes 10 @recipes/cpu.args
    python experiments/quality.py --minutes 2 5 10 @recipes/cpu.args --ccl_weight 5  # flags after the recipe override it

For each time budget it trains (train.py --max_minutes) the recipe and a paired-L1 reference (the same
flags, but only the original matching loss: no adversarial, cycle or identity term, no discriminator),
harmonizes the held-out test volumes of the demo data with inference_nii.py --reference_dir, and prints
SSIM / PSNR / MAE against the real target-vendor volumes for: the recipe, the paired-L1 reference, the
unharmonized input and histogram matching, and the fine detail of each (inference_nii.py's Detail column)
as a ratio to the real target scan's: 1 = as much fine texture and noise as that vendor's scan, below 1 = smoother.
The last line printed is one JSON object with the figures.
Any flag this script does not know is passed to train.py.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import pandas as pd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from utils.arguments import parse_arguments
from utils.cli import CliParser
from utils.errors import UserError, run_cli
from utils.evaluation import ORACLE
from utils.paths import check_writable_folder

PAIRED_L1_FLAGS = ['--adv_weight', '0', '--ccl_weight', '0', '--identity_weight', '0',
                   '--warmup_epochs', '0', '--rampup_epochs', '0']


def build_parser():
    parser = CliParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    parser.add_argument('--skip_paired', action='store_true', help='do not train the paired-L1 reference')
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


def prepare_data(args):
    """The paired dataset (with held-out test volumes) that every run trains and is measured on."""
    nifti = args.data_dir or os.path.join(args.work_dir, 'nifti')
    if args.data_dir is None and not os.path.exists(os.path.join(nifti, '.complete')):
        run(['dataset/make_demo_data.py', '--output_dir', nifti, '--subjects', str(args.subjects), '--overwrite'],
            os.path.join(args.work_dir, 'make_demo_data.log'))
        open(os.path.join(nifti, '.complete'), 'w').close()
    dataset = os.path.join(args.work_dir, 'dataset')
    run(['dataset/generate_paired_dataset.py', '--vendor1_dir', os.path.join(nifti, 'SIEMENS'),
         '--vendor2_dir', os.path.join(nifti, 'Philips'), '--output_dir', dataset, '--split_ratio', '0.8',
         '--test_ratio', '0.2', '--overwrite'], os.path.join(args.work_dir, 'generate_paired_dataset.log'))
    return dataset


def train_and_measure(label, flags, minutes, dataset, args):
    """Train for `minutes`, harmonize the test volumes; returns the mean metrics per method, the wall time and
    train.py's summary.json (optimizer steps, seconds of training steps)."""
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
    run(['inference_nii.py', '--experiment', experiment, '--save_dir', runs, '--epoch', 'latest',
         '--input_dir', os.path.join(dataset, 'testset', 'SIEMENS'),
         '--reference_dir', os.path.join(dataset, 'testset', 'Philips'), '--output_dir', output, '--overwrite'],
        os.path.join(runs, f'{experiment}.inference.log'))
    table = pd.read_csv(os.path.join(output, 'metrics.csv'))
    means = table[table['volume'] == 'mean'].set_index('method')[['SSIM', 'PSNR', 'MAE', 'Detail']]
    return means, wall, summary


def training_figures(wall, summary):
    """What the table shows of a training run: wall time of train.py, and from its summary.json the optimizer
    steps and the seconds of training steps (--max_minutes counts these: nominal ones with --nominal_cost)."""
    return {'train_wall_s': round(wall, 1), 'steps': summary['steps_this_run'],
            'train_seconds': round(summary['train_seconds'], 1)}


def absolute_flag_files(flags):
    """'@file' flags with the file's absolute path: the scripts run in the repository, not in the caller's folder."""
    return ['@' + os.path.abspath(flag[1:]) if flag.startswith('@') else flag for flag in flags]


def main(argv):
    args, recipe = build_parser().parse_known_args(argv)
    # the scripts run in the repository: paths given relative to here must not change meaning
    args.work_dir = os.path.abspath(args.work_dir)
    args.data_dir = args.data_dir and os.path.abspath(args.data_dir)
    given, recipe = recipe, absolute_flag_files(recipe)
    if any(not m > 0 for m in args.minutes):
        raise UserError('--minutes must be positive')
    if args.nominal_cost is not None and not args.nominal_cost >= 1:
        raise UserError('--nominal_cost must be at least 1 (a CycleGAN step costs more than a paired one)')
    parse_arguments(['-ex', 'check', *recipe])  # an unknown or bad recipe flag stops here, before any training
    check_writable_folder(args.work_dir, '--work_dir')
    paired_flags = recipe + PAIRED_L1_FLAGS
    os.makedirs(args.work_dir, exist_ok=True)
    dataset = prepare_data(args)

    results = []
    for minutes in args.minutes:
        entry = {'minutes': minutes}
        means, wall, summary = train_and_measure(args.name, recipe, minutes, dataset, args)
        entry[args.name] = {**means.loc['harmonized'].to_dict(), **training_figures(wall, summary)}
        entry['unharmonized'] = means.loc['unharmonized'].to_dict()
        entry['histogram_matching'] = means.loc[ORACLE].to_dict()
        if not args.skip_paired:
            means, wall, summary = train_and_measure('paired_l1', paired_flags, minutes, dataset, args)
            entry['paired_l1'] = {**means.loc['harmonized'].to_dict(), **training_figures(wall, summary)}
        results.append(entry)
        print(f'\n{minutes:g} minutes of training (SSIM / PSNR dB / MAE against the real Philips volumes, and fine '
              'detail as a ratio to theirs):')
        for method in (args.name, 'paired_l1', 'histogram_matching', 'unharmonized'):
            if method in entry:
                m = entry[method]
                print(f'  {method:<20} {m["SSIM"]:.4f}  {m["PSNR"]:6.2f}  {m["MAE"]:.4f}  {m["Detail"]:.2f}'
                      + (f'   ({m["steps"]} steps, trained {m["train_wall_s"]:.0f} s wall)' if 'steps' in m else ''))
        sys.stdout.flush()
    print(json.dumps({'recipe_flags': given, 'name': args.name, 'results': results}))


if __name__ == '__main__':
    run_cli(main)
