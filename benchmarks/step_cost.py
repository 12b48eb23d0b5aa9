"""Time of one training step by which loss terms it computes, relative to a paired (matching-only) step.

    python benchmarks/step_cost.py @recipes/cpu.args          # the recipe's networks, batch, --gan_slices, --gan_every
    python benchmarks/step_cost.py --ngf 64 --n_res_blocks 9 --ndf 64 --batch_size 4 --height 128 --width 128

Runs CycleGANTrainer.step on random slices (the cost does not depend on the values) for: the paired term
alone (the recipe's warm-up), the CycleGAN terms on the whole batch, with --gan_slices N when given, and the
paired term with each extra term alone (the adversarial one with its discriminator step).
Prints the median time of each and its ratio to the paired step. The CPU must be otherwise idle.
"""
import statistics
from dataclasses import replace
import time

import torch

from utils.arguments import parse_arguments
from utils.cli import CliParser
from utils.cpu_memory import keep_freed_memory
from utils.device import amp_description, pick_device
from utils.errors import UserError, run_cli
from utils.losses import full_weights, lazy_weights
from utils.trainer import CycleGANTrainer


def main(argv):
    parser = CliParser(description=__doc__.splitlines()[0], fromfile_prefix_chars='@', allow_abbrev=False)
    parser.add_argument('--height', type=int, default=99, help='slice height (the demo data: 99)')
    parser.add_argument('--width', type=int, default=117, help='slice width (the demo data: 117)')
    parser.add_argument('--repeats', type=int, default=6, help='timed rounds of 8 steps per case')
    ours, train_argv = parser.parse_known_args(argv)
    args = parse_arguments(['-ex', 'step_cost', *train_argv])
    if args.max_minutes:
        raise UserError('--max_minutes does not apply here')
    device = pick_device(args.device)
    if device.type != 'cpu':
        where = f'--device {args.device}' + (f' picked {device.type}' if args.device == 'auto' else '')
        raise UserError(f'{where}: this script times CPU steps; use --device cpu, or benchmarks/benchmark.py on a GPU')
    keep_freed_memory()
    trainer = CycleGANTrainer(args, device, experiment_dir='', build_data=False)  # writes nothing
    real_A, real_B = trainer._to_device(torch.rand(2, args.batch_size, 1, ours.height, ours.width) * 2 - 1)
    full = full_weights(args)
    paired = replace(full, adv=0.0, ccl=0.0, identity=0.0)
    # name -> (weights, --gan_slices, --gan_every)
    cases = {'paired term only': (paired, 0, 1), 'CycleGAN, whole batch': (full, 0, 1)}
    if args.gan_slices:
        cases[f'CycleGAN, --gan_slices {args.gan_slices}'] = (full, args.gan_slices, 1)
    # what each extra term adds (with the discriminator step for the adversarial one), on the same slices
    on = f', --gan_slices {args.gan_slices}' if args.gan_slices else ''
    if full.ccl and full.adv:
        cases[f'paired + cycle{on}'] = (replace(paired, ccl=full.ccl), args.gan_slices, 1)
        cases[f'paired + adversarial{on}'] = (replace(paired, adv=full.adv), args.gan_slices, 1)
    if args.gan_every > 1:  # the mean step when every K-th one is a CycleGAN step
        cases[f'CycleGAN{on}, --gan_every {args.gan_every}'] = (full, args.gan_slices, args.gan_every)
    times = {name: [] for name in cases}
    for round_ in range(ours.repeats + 1):  # the first round warms up
        for name, (weights, gan_slices, every) in cases.items():
            trainer.args.gan_slices = gan_slices
            steps = every * max(1, 8 // every)  # whole cycles of K steps
            started = time.perf_counter()
            for index in range(steps):
                trainer.step(real_A, real_B, lazy_weights(weights, index, every))
            if round_:
                times[name].append((time.perf_counter() - started) / steps)
    base = statistics.median(times['paired term only'])
    print(f'batch {args.batch_size} of {ours.height}x{ours.width}, ngf {args.ngf}, {args.n_res_blocks} blocks'
          f'{", input skip" if args.input_skip else ""}, '
          f'ndf {args.ndf}, {amp_description(trainer.amp, trainer.device)}, {torch.get_num_threads()} threads; '
          f'median of {ours.repeats} x 8 steps')
    for name, values in times.items():
        print(f'  {name:38s} {statistics.median(values) * 1000:8.1f} ms  {statistics.median(values) / base:.2f}x')


if __name__ == '__main__':
    run_cli(main)
