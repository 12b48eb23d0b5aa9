"""The recipe against the paired-L1 reference over several seeds at once, every run on CPUs of its own.

    python experiments/quality_seeds.py --minutes 2 --seeds 1 2 3 4 --data_dir demo/nifti @recipes/cpu.args

Short runs are noisy: how many steps fit in the minutes, and so the SSIM, varies from run to run with the
machine's load. This script starts, for each seed, experiments/quality.py for the recipe and for the paired-L1
reference at the same time, each pinned to --cores_per_job CPUs of its own (2 by default, a small laptop), so
that all of them train at the same time under the same conditions; it needs 2 x seeds x cores_per_job CPUs
(logical CPUs: with hyperthreading, two runs may share a physical core). It prints one row per seed and the
mean difference over the seeds; the last line is one JSON object. Training runs on the CPU; flags this script
does not know go to train.py.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from experiments.quality import PAIRED_L1_FLAGS, absolute_flag_files
from utils.arguments import parse_arguments
from utils.cli import CliParser
from utils.errors import UserError, run_cli
from utils.paths import check_writable_folder

KINDS = ('recipe', 'paired_l1')


def build_parser():
    parser = CliParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--minutes', type=float, default=2.0, help='training time of every run, in minutes of steps')
    parser.add_argument('--seeds', type=int, nargs='+', default=[1, 2, 3, 4], help='one recipe and one paired run each')
    parser.add_argument('--cores_per_job', type=int, default=2, help='CPUs (and threads) of each run')
    parser.add_argument('--data_dir', required=True, help='folder with SIEMENS/ and Philips/ NIfTI volumes')
    parser.add_argument('--work_dir', default=os.path.join('results', 'quality_seeds'),
                        help='one quality.py work folder per run goes here')
    parser.add_argument('--debug', action='store_true', help='show full tracebacks')
    return parser


def check(args, recipe):
    """Refuse, before any run starts, everything that would make a run fail."""
    if not args.minutes > 0:
        raise UserError('--minutes must be positive')
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError(f'--seeds has repeats ({" ".join(map(str, args.seeds))}): give each seed once')
    if any(not 0 <= seed < 2 ** 32 for seed in args.seeds):
        raise UserError('--seeds must be between 0 and 2**32 - 1')
    if any(flag == '--random_seed' or flag.startswith('--random_seed=') for flag in recipe):
        raise UserError('--random_seed is set per run here: list the seeds in --seeds')
    if args.cores_per_job < 1:
        raise UserError('--cores_per_job must be at least 1')
    for vendor in ('SIEMENS', 'Philips'):
        if not os.path.isdir(os.path.join(args.data_dir, vendor)):
            raise UserError(f'{args.data_dir} has no {vendor}/ folder: pass the folder that holds SIEMENS/ and Philips/ '
                            '(make demo writes demo/nifti)')
    parse_arguments(['-ex', 'check', *recipe])  # an unknown or bad recipe flag stops here
    check_writable_folder(args.work_dir, '--work_dir')


def cpus_for_runs(runs, cpus_per_run):
    """The CPUs of each run: consecutive groups of the CPUs this process may use."""
    if not hasattr(os, 'sched_setaffinity'):
        raise UserError('this system (macOS or Windows) cannot pin a process to CPUs: run experiments/quality.py '
                        'once per seed (--random_seed N) instead')
    cpus = sorted(os.sched_getaffinity(0))
    if runs * cpus_per_run > len(cpus):
        raise UserError(f'{runs} runs x {cpus_per_run} CPUs need {runs * cpus_per_run} CPUs and this process may use '
                        f'{len(cpus)}: pass fewer --seeds or a smaller --cores_per_job')
    return [cpus[i * cpus_per_run:(i + 1) * cpus_per_run] for i in range(runs)]


def start_pinned(command, cpus, log_path):
    """Start `command` in a session of its own (so that it can be stopped with its children), its output to
    `log_path`, pinned to `cpus` with as many threads; its children inherit both."""
    with open(log_path, 'w') as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, 'OMP_NUM_THREADS': str(len(cpus))})
    # Popen returns once the exec has succeeded, almost always before Python starts a thread; its train.py and
    # inference_nii.py, started later from its main thread, are pinned whatever happens
    os.sched_setaffinity(process.pid, cpus)
    return process


def start(kind, seed, cpus, recipe, args):
    """One quality.py run in the background on `cpus`; returns the process and its log path."""
    work = os.path.join(args.work_dir, f'seed{seed}_{kind}')
    os.makedirs(work, exist_ok=True)
    flags = [*recipe, '--random_seed', str(seed), '--device', 'cpu', *(PAIRED_L1_FLAGS if kind == 'paired_l1' else [])]
    command = [sys.executable, os.path.join(REPO, 'experiments', 'quality.py'), '--minutes', str(args.minutes),
               '--data_dir', args.data_dir, '--work_dir', work, '--name', kind, '--skip_paired', *flags]
    log_path = os.path.join(work, 'quality.log')
    return start_pinned(command, cpus, log_path), log_path


def finish(process, log_path):
    """The figures of a run that has ended, from quality.py's JSON line, or a one-line error naming its log."""
    with open(log_path) as f:
        lines = [line for line in f.read().replace('\r', '\n').splitlines() if line.strip()]
    report = None
    for line in reversed(lines):
        if line.startswith('{'):
            try:
                report = json.loads(line)['results'][0]
            except (ValueError, KeyError, IndexError):
                pass
            break
    if process.returncode != 0 or report is None:
        raise UserError(f'a run failed, see {log_path}: {lines[-1] if lines else "no output"}', exit_code=1)
    return report


def wait_for_all(running):
    """The figures of every run, as they finish; the first run that fails ends the wait with its error."""
    entries = {}
    while len(entries) < len(running):
        for job, (process, log_path) in running.items():
            if job not in entries and process.poll() is not None:
                entries[job] = finish(process, log_path)
        time.sleep(1)
    return entries


def stop_all(running):
    """Stop the runs still going, each with its train.py or inference_nii.py, undisturbed by further signals."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    alive = [process for process, _ in running.values() if process.poll() is None]
    for process in alive:
        os.killpg(process.pid, signal.SIGTERM)
    for process in alive:
        process.wait()


def main(argv):
    args, recipe = build_parser().parse_known_args(argv)
    # the runs start in the repository: paths given relative to here must not change meaning
    args.data_dir, args.work_dir = os.path.abspath(args.data_dir), os.path.abspath(args.work_dir)
    given, recipe = recipe, absolute_flag_files(recipe)
    check(args, recipe)
    jobs = [(kind, seed) for seed in args.seeds for kind in KINDS]
    cpu_groups = cpus_for_runs(len(jobs), args.cores_per_job)
    # the runs are in sessions of their own: neither Ctrl-C nor a closed terminal reaches them, so this script
    # stops them (finally) when it is interrupted, killed or hung up on
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda number, _: sys.exit(128 + number))
    running = {}
    try:
        for job, cpus in zip(jobs, cpu_groups):
            running[job] = start(*job, cpus, recipe, args)
        print(f'{len(jobs)} runs of {args.minutes:g} minutes started, {args.cores_per_job} CPUs each; logs in '
              f'{args.work_dir}/seed*_*/quality.log', flush=True)
        entries = wait_for_all(running)
    finally:
        stop_all(running)

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
    print(json.dumps({'recipe_flags': given, 'minutes': args.minutes, 'cores_per_job': args.cores_per_job,
                      'seeds': rows, 'mean_difference': mean, **baselines}))


if __name__ == '__main__':
    run_cli(main)
