"""The recipe against the paired-L1 reference over several seeds at once, every run on CPU cores of its own.

    python benchmarks/quality_seeds.py --minutes 2 --seeds 1 2 3 4 --data_dir demo/nifti @recipes/cpu.args

Short runs are noisy: how many steps fit in the minutes, and so the SSIM, varies from run to run with the
machine's load. This script starts, for each seed, benchmarks/quality.py for the recipe and for the paired-L1
reference at the same time, each pinned to --cores_per_job CPU cores of its own (2 by default, a small
laptop), so that all of them train under the same load; it needs 2 x seeds x cores_per_job cores. It prints
one row per seed and the mean difference over the seeds; the last line is one JSON object. Training runs on
the CPU; flags this script does not know go to train.py.
"""
import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks.quality import PAIRED_L1_FLAGS  # noqa: E402
from utils.arguments import CliParser, parse_arguments  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402

KINDS = ('recipe', 'paired_l1')


def build_parser():
    parser = CliParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--minutes', type=float, default=2.0, help='training time of every run, in minutes of steps')
    parser.add_argument('--seeds', type=int, nargs='+', default=[1, 2, 3, 4], help='one recipe and one paired run each')
    parser.add_argument('--cores_per_job', type=int, default=2, help='CPU cores (and threads) of each run')
    parser.add_argument('--data_dir', required=True, help='folder with SIEMENS/ and Philips/ NIfTI volumes')
    parser.add_argument('--work_dir', default=os.path.join('results', 'quality_seeds'),
                        help='one quality.py work folder per run goes here')
    parser.add_argument('--debug', action='store_true', help='show full tracebacks')
    return parser


def check(args, recipe):
    """Everything that can be refused before any run starts."""
    if not args.minutes > 0:
        raise UserError('--minutes must be positive')
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError(f'--seeds has repeats ({" ".join(map(str, args.seeds))}): give each seed once')
    if '--random_seed' in recipe:
        raise UserError('--random_seed is set per run here: list the seeds in --seeds')
    if args.cores_per_job < 1:
        raise UserError('--cores_per_job must be at least 1')
    for vendor in ('SIEMENS', 'Philips'):
        if not os.path.isdir(os.path.join(args.data_dir, vendor)):
            raise UserError(f'{args.data_dir} has no {vendor}/ folder: pass the folder that holds SIEMENS/ and Philips/ '
                            '(make demo writes demo/nifti)')
    parse_arguments(['-ex', 'check', *recipe])  # an unknown or bad recipe flag stops here
    cores = sorted(os.sched_getaffinity(0))
    needed = 2 * len(args.seeds) * args.cores_per_job
    if needed > len(cores):
        raise UserError(f'{2 * len(args.seeds)} runs x {args.cores_per_job} cores need {needed} CPU cores and this '
                        f'process may use {len(cores)}: pass fewer --seeds or a smaller --cores_per_job')
    return cores


def start(kind, seed, cores, recipe, args):
    """One quality.py run in the background, pinned to `cores`; returns the process and its log path."""
    work = os.path.join(args.work_dir, f'seed{seed}_{kind}')
    os.makedirs(work, exist_ok=True)
    flags = [*recipe, '--random_seed', str(seed), '--device', 'cpu', *(PAIRED_L1_FLAGS if kind == 'paired_l1' else [])]
    command = [sys.executable, os.path.join(REPO, 'benchmarks', 'quality.py'), '--minutes', str(args.minutes),
               '--data_dir', args.data_dir, '--work_dir', work, '--name', kind, '--skip_paired', *flags]
    log_path = os.path.join(work, 'quality.log')
    with open(log_path, 'w') as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, 'OMP_NUM_THREADS': str(len(cores))},
                                   preexec_fn=lambda: os.sched_setaffinity(0, cores))
    return process, log_path


def finish(process, log_path):
    """Wait for a run; its figures from quality.py's JSON line, or a one-line error naming its log."""
    process.wait()
    with open(log_path) as f:
        lines = [line for line in f.read().replace('\r', '\n').splitlines() if line.strip()]
    if process.returncode != 0 or not lines or not lines[-1].startswith('{'):
        raise UserError(f'a run failed, see {log_path}: {lines[-1] if lines else "no output"}', exit_code=1)
    return json.loads(lines[-1])['results'][0]


def main(argv):
    args, recipe = build_parser().parse_known_args(argv)
    args.data_dir, args.work_dir = os.path.abspath(args.data_dir), os.path.abspath(args.work_dir)
    cores = check(args, recipe)
    jobs = [(kind, seed) for seed in args.seeds for kind in KINDS]
    running = {job: start(*job, cores[i * args.cores_per_job:(i + 1) * args.cores_per_job], recipe, args)
               for i, job in enumerate(jobs)}
    print(f'{len(jobs)} runs of {args.minutes:g} minutes started, {args.cores_per_job} cores each; logs in '
          f'{args.work_dir}/seed*_*/quality.log', flush=True)
    try:
        entries = {job: finish(*running[job]) for job in jobs}
    finally:  # after a failure, stop the runs still going
        for process, _ in running.values():
            if process.poll() is None:
                process.kill()

    rows, baselines = [], None
    print(f'\n{args.minutes:g} minutes, SSIM / PSNR dB against the real Philips volumes (optimizer steps):')
    print(f'  {"seed":>6}  {"recipe":<22}  {"paired-L1":<22}  recipe - paired')
    for seed in args.seeds:
        recipe_entry, paired_entry = entries['recipe', seed], entries['paired_l1', seed]
        ours, paired = recipe_entry['recipe'], paired_entry['paired_l1']
        baselines = baselines or {m: recipe_entry[m] for m in ('histogram_matching', 'unharmonized')}
        difference = {m: ours[m] - paired[m] for m in ('SSIM', 'PSNR', 'MAE')}
        rows.append({'seed': seed, 'recipe': ours, 'paired_l1': paired, 'difference': difference})
        print(f'  {seed:>6}  {ours["SSIM"]:.4f} / {ours["PSNR"]:5.2f} ({ours["steps"]:>5})  '
              f'{paired["SSIM"]:.4f} / {paired["PSNR"]:5.2f} ({paired["steps"]:>5})  '
              f'{difference["SSIM"]:+.4f} / {difference["PSNR"]:+.2f}')
    mean = {m: sum(row['difference'][m] for row in rows) / len(rows) for m in ('SSIM', 'PSNR', 'MAE')}
    print(f'  {"mean":>6}  {"":<22}  {"":<22}  {mean["SSIM"]:+.4f} / {mean["PSNR"]:+.2f}')
    for method, m in baselines.items():
        print(f'  {method}: {m["SSIM"]:.4f} / {m["PSNR"]:.2f}')
    print(json.dumps({'recipe_flags': recipe, 'minutes': args.minutes, 'cores_per_job': args.cores_per_job,
                      'seeds': rows, 'mean_difference': mean, **baselines}))


if __name__ == '__main__':
    run_cli(main)
