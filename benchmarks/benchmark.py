"""Training and inference speed of the CycleGAN on whatever device is present, against the original code.

    python benchmarks/benchmark.py --quick           # under 3 minutes on a 2-core CPU
    python benchmarks/benchmark.py                   # longer, steadier figures, both network sizes
    python benchmarks/benchmark.py --quick --amp     # adds bfloat16-autocast entries (about twice the time)

Network sizes are train.py's: "default" its defaults, "cpu" the networks of recipes/cpu.args, both read through
train.py's parser and built by CycleGANTrainer as train.py builds them. It measures, with the same networks,
batch and precision on both sides:
  training    samples/s of CycleGANTrainer.step (all four loss terms on the whole batch) and of the original
              code's step (benchmarks/reference_step.py) on the same trainer's networks and optimizers, and
              their ratio train_step_speedup;
  inference   slices/s of inference_nii.harmonize_slices in batches and one slice at a time, and their ratio
              batched_inference_speedup;
  efficiency  the generator's forward FLOPs per slice (FlopCounterMode, a multiply-add counts 2) and the
              achieved GFLOP/s of the batched forward as a fraction of the measured matmul rate of the same
              precision (matmul_fraction);
  memory      peak memory: torch.cuda.max_memory_allocated per measurement on CUDA, the process's peak RSS
              (monotone over the run, so each figure includes the ones before) elsewhere.

Each timing is torch.utils.benchmark's blocked_autorange: one untimed warm-up call, then calls until
--min_run_time seconds have passed; figures are medians (matmul_fraction compares the best batched forward
with the best matmul). Human-readable lines first; the last line printed is one JSON object with all the figures.
"""
import argparse
import json
import os
import platform
import resource
import sys
import time

import numpy as np
import torch
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.reference_step import reference_step
from inference_nii import harmonize_slices
from model.generator import build_generator, generator_config
from utils.arguments import parse_arguments
from utils.cpu_memory import keep_freed_memory
from utils.device import amp_description, amp_supported, autocast, autocast_dtype, pick_device
from utils.errors import UserError, run_cli
from utils.losses import full_weights
from utils.trainer import CycleGANTrainer, init_weights

RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'recipes', 'cpu.args')
# network size -> train.py flags that give it
SIZES = {'default': [], 'cpu': ['@' + RECIPE]}
# the loss weights of train.py's defaults, all terms on (the state after warm-up and ramp-up)
WEIGHTS = full_weights(parse_arguments(['-ex', 'benchmark']))


def size_arguments(name):
    """train.py's flags of a network size."""
    return parse_arguments([*SIZES[name], '-ex', 'benchmark'])


def describe(name):
    args = size_arguments(name)
    return (f'{name} (ngf {args.ngf}, {args.n_res_blocks} blocks{", input skip" if args.input_skip else ""}, '
            f'ndf {args.ndf})')


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--device', choices=['auto', 'cpu', 'cuda', 'mps'], default='auto')
    parser.add_argument('--quick', action='store_true',
                        help='short timings, training only the CPU-sized networks (a default-network step takes '
                             'many seconds on a small CPU): under 3 minutes on an idle 2-core CPU')
    parser.add_argument('--amp', action='store_true',
                        help='also measure under utils.device.autocast (bfloat16 on CPU/recent GPUs): extra entries')
    parser.add_argument('--image_size', type=int, default=256, help='slices are IMAGE_SIZE x IMAGE_SIZE')
    parser.add_argument('--train_sizes', default=None,
                        help='comma-separated network sizes to train (default, cpu); default: cpu with --quick, '
                             'else cpu,default')
    parser.add_argument('--infer_sizes', default='cpu,default', help='comma-separated network sizes for inference')
    parser.add_argument('--train_batch', type=int, default=None,
                        help='slices of each vendor per training step (default 2; 16 on CUDA)')
    parser.add_argument('--infer_batch', type=int, default=None,
                        help='harmonize_slices batch size (default 8 with --quick, else 16; 64 on CUDA)')
    parser.add_argument('--single_slices', type=int, default=None,
                        help='slices in the one-at-a-time loop (default 4 with --quick, else 8)')
    parser.add_argument('--min_run_time', type=float, default=None,
                        help='seconds of timed calls per measurement, after one warm-up call (default 4 with '
                             '--quick, else 15)')
    parser.add_argument('--matmul_size', type=int, default=None, help='square matmul size (default 2048, 4096 on CUDA)')
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: torch\'s choice)')
    parser.add_argument('--channels_last', action='store_true',
                        help='networks and inputs in channels-last memory format, as train.py --channels_last')
    parser.add_argument('--profile', action='store_true',
                        help='also print where one batched forward of each inference size spends its time '
                             '(torch.profiler, ops grouped by layer kind)')
    parser.add_argument('--debug', action='store_true', help='show full tracebacks')
    return parser


def parse_sizes(text, option):
    names = [name.strip() for name in text.split(',') if name.strip()]
    unknown = [name for name in names if name not in SIZES]
    if unknown or not names:
        raise UserError(f'{option} {text}: choose from {", ".join(SIZES)}')
    return names


# ---- timing and memory ------------------------------------------------------------------------------
def synchronize(device):
    """Wait for queued GPU work, so the clock reads the work's end and not its launch."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    elif device.type == 'mps':
        torch.mps.synchronize()


def peak_memory_mib(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == 'darwin' else peak / 2 ** 10  # bytes on macOS, KiB on Linux


def memory_kind(device):
    if device.type == 'cuda':
        return 'torch.cuda.max_memory_allocated, per measurement'
    return 'process peak RSS (resource.getrusage), monotone over the run: includes earlier measurements'


def measure(fn, device, min_run_time):
    """Seconds per call of fn (torch.utils.benchmark.Timer.blocked_autorange, on this process's threads), the
    peak memory reached, and the CPU share: this process's CPU time over wall time x threads, near 1 when it
    had the cores to itself, well below when other processes took turns on them (which slows every timing)."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    timer = benchmark.Timer('fn(); synchronize(device)', globals={'fn': fn, 'synchronize': synchronize,
                                                                   'device': device},
                            num_threads=torch.get_num_threads())
    cpu_started, wall_started = time.process_time(), time.perf_counter()
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    share = (time.process_time() - cpu_started) / ((time.perf_counter() - wall_started) * torch.get_num_threads())
    return measurement, peak_memory_mib(device), share


# ---- networks and data ------------------------------------------------------------------------------
def build_trainer(size, device, amp, channels_last):
    """The CycleGANTrainer train.py builds for this size (seeded by its --random_seed, so every run times the
    same weights), in the benchmark's precision and memory format, the CycleGAN terms on the whole batch as
    in the original step. Writes nothing."""
    args = size_arguments(size)
    args.amp, args.channels_last, args.compile, args.gan_slices = 'on' if amp else 'off', channels_last, False, 0
    return CycleGANTrainer(args, device, experiment_dir='', build_data=False)


def inference_generator(size, device, memory_format):
    """The generator of this size as training initialises it (seeded)."""
    torch.manual_seed(0)
    generator = build_generator(generator_config(size_arguments(size))).apply(init_weights)
    return generator.to(device, memory_format=memory_format).eval()


def random_slices(batch, image_size, device, memory_format, seed=0):
    """A batch of (batch, 1, H, W) images in [-1, 1], the generators' input range."""
    images = torch.rand(batch, 1, image_size, image_size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return images.to(device).contiguous(memory_format=memory_format)


# ---- training: CycleGANTrainer.step against the original step --------------------------------------
def training_calls(trainer, real_A, real_B):
    """(ours, reference): one call each is one training step on the trainer's networks and optimizers."""
    def ours():
        trainer.step(real_A, real_B, WEIGHTS)

    def reference():
        reference_step(trainer.nets, trainer.optimizer_G, trainer.optimizer_D, trainer.scaler, real_A, real_B,
                       WEIGHTS, trainer.args.real_label, trainer.device, trainer.amp)
    return ours, reference


def training_flops(size, config):
    """FLOPs per sample of our step and of the reference step (forward and backward; counted on the meta
    device, so nothing is computed). Their ratio is the speedup to expect where every FLOP costs the same."""
    trainer = build_trainer(size, torch.device('meta'), amp=False, channels_last=False)
    trainer.device = torch.device('cpu')  # for its autocast(), which has no meta device; nothing runs on the CPU
    real_A = torch.empty(config.train_batch, 1, config.image_size, config.image_size, device='meta')
    flops = []
    for step in training_calls(trainer, real_A, torch.empty_like(real_A)):
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        flops.append(counter.get_total_flops() / config.train_batch)
    return flops


def measure_training(size, config, device, amp, channels_last):
    """Samples/s of our step and of the reference step, same networks, optimizers, batch and precision."""
    trainer = build_trainer(size, device, amp, channels_last)
    real_A = random_slices(config.train_batch, config.image_size, device, trainer.memory_format, seed=1)
    real_B = random_slices(config.train_batch, config.image_size, device, trainer.memory_format, seed=2)
    ours, reference = training_calls(trainer, real_A, real_B)
    # ours first: on the CPU the peak RSS is monotone, so its figure is ours alone
    time_ours, memory_ours, share_ours = measure(ours, device, config.min_run_time)
    time_reference, memory_reference, share_reference = measure(reference, device, config.min_run_time)
    return {
        'size': size, 'generator_config': trainer.nets['G_AB'].config, 'ndf': trainer.args.ndf,
        'image_size': config.image_size, 'batch': config.train_batch, 'precision': amp_description(amp, device),
        'ours_step_s': time_ours.median, 'reference_step_s': time_reference.median,
        'ours_step_s_all': time_ours.times, 'reference_step_s_all': time_reference.times,
        'train_samples_per_s': config.train_batch / time_ours.median,
        'reference_samples_per_s': config.train_batch / time_reference.median,
        'train_step_speedup': time_reference.median / time_ours.median,
        'peak_memory_mib_ours': memory_ours, 'peak_memory_mib_reference': memory_reference,
        'cpu_share': min(share_ours, share_reference),
    }


def describe_training_flops(size, config):
    ours, reference = training_flops(size, config)
    print(f'training step FLOPs per sample, {size} networks: ours {ours / 1e9:.0f} GFLOP, reference '
          f'{reference / 1e9:.0f} GFLOP (ratio {reference / ours:.2f}: the speedup where every FLOP costs the same)')
    return {'ours_gflop_per_sample': ours / 1e9, 'reference_gflop_per_sample': reference / 1e9,
            'flop_ratio': reference / ours}


# ---- inference and efficiency -----------------------------------------------------------------------
def forward_flops(size, image_size):
    """FLOPs of one generator forward on one slice, counted on the meta device (nothing is computed)."""
    with torch.device('meta'):
        generator = build_generator(generator_config(size_arguments(size)))
        image = torch.empty(1, 1, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        generator(image)
    return counter.get_total_flops()


def matmul_rate(n, dtype, device, min_run_time):
    """Best GFLOP/s of an n x n matmul in dtype (2 n^3 FLOPs)."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=generator).to(device, dtype) for _ in range(2))
    measurement, _, _ = measure(lambda: torch.matmul(a, b), device, min_run_time)
    return 2 * n ** 3 / min(measurement.times) / 1e9


def measure_inference(size, config, device, amp, memory_format, flops):
    """harmonize_slices slices/s in batches and one slice at a time, and the batched forward's GFLOP/s."""
    generator = inference_generator(size, device, memory_format)
    slices = np.random.default_rng(0).random((config.infer_batch, config.image_size, config.image_size),
                                             dtype=np.float32)
    single = slices[:config.single_slices]
    time_single, memory_single, share_single = measure(lambda: harmonize_slices(generator, single, 1, device, amp),
                                                       device, config.min_run_time)
    time_batched, memory_batched, share_batched = measure(
        lambda: harmonize_slices(generator, slices, config.infer_batch, device, amp), device, config.min_run_time)
    batched_rate = len(slices) / time_batched.median
    single_rate = len(single) / time_single.median
    return {
        'size': size, 'generator_config': generator.config, 'image_size': config.image_size,
        'batch': config.infer_batch, 'precision': amp_description(amp, device),
        'inference_slices_per_s': batched_rate, 'single_slices_per_s': single_rate,
        'batched_inference_speedup': batched_rate / single_rate,
        'batched_call_s_all': time_batched.times, 'single_loop_s_all': time_single.times,
        'forward_gflop_per_slice': flops / 1e9,
        'forward_gflops_median': batched_rate * flops / 1e9,
        'forward_gflops_best': len(slices) / min(time_batched.times) * flops / 1e9,
        'single_forward_gflops_best': len(single) / min(time_single.times) * flops / 1e9,
        'peak_memory_mib_single': memory_single, 'peak_memory_mib_batched': memory_batched,
        'cpu_share': min(share_single, share_batched),
    }


def dtype_name(dtype):
    return str(dtype).replace('torch.', '')


def layer_kind(name, shapes):
    """A readable group for a profiled op: convolutions by channels, kernel and input size, the rest by op name."""
    if name in ('aten::mkldnn_convolution', 'aten::cudnn_convolution', 'aten::convolution_overrideable') \
            and len(shapes) > 1 and len(shapes[0]) == 4 and len(shapes[1]) == 4:
        image, weight = shapes[0], shapes[1]
        kind = 'residual blocks' if weight[0] == weight[1] == image[1] and weight[2:] == [3, 3] else ''
        return f'conv {image[1]}->{weight[0]} {weight[2]}x{weight[3]} on {image[2]}x{image[3]} {kind}'.rstrip()
    if name in ('aten::_convolution', 'aten::copy_', 'aten::clone'):
        return 'conv-transpose (aten::_convolution self time + layout copy)'
    return {'aten::native_batch_norm': 'InstanceNorm (aten::native_batch_norm)',
            'aten::reflection_pad2d': 'ReflectionPad2d', 'aten::clamp_min_': 'ReLU', 'aten::relu_': 'ReLU',
            'aten::add': 'residual add', 'aten::tanh': 'Tanh'}.get(name, name)


def profile_forward(size, config, device, amp, memory_format):
    """Self time of one batched generator forward, grouped by layer kind, as (group, ms per slice, share) rows."""
    generator = inference_generator(size, device, memory_format)
    images = random_slices(config.infer_batch, config.image_size, device, memory_format)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == 'cuda':
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.inference_mode(), autocast(device, amp):
        generator(images)
        synchronize(device)
        with torch.profiler.profile(activities=activities, record_shapes=True) as profiler:
            generator(images)
            synchronize(device)
    groups = {}
    for event in profiler.key_averages(group_by_input_shape=True):
        kind = layer_kind(event.key, event.input_shapes)
        self_us = event.self_device_time_total if device.type == 'cuda' else event.self_cpu_time_total
        groups[kind] = groups.get(kind, 0.0) + self_us / 1e3
    total = sum(groups.values())
    rows = sorted(groups.items(), key=lambda item: -item[1])
    return [(kind, ms / config.infer_batch, ms / total) for kind, ms in rows if ms / total >= 0.005]


def matmul_dtype_of(precision):
    """'autocast bfloat16' -> 'bfloat16': the matmul rate a forward in that precision is compared with."""
    return precision.split()[-1]


# ---- report -----------------------------------------------------------------------------------------
def device_description(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    if device.type == 'mps':
        return 'Apple MPS'
    return platform.processor() or platform.machine()


def skipped_parts(device):
    """What this device cannot measure, said out loud rather than silently left out."""
    skipped = []
    if device.type != 'cuda':
        reason = 'not present' if not torch.cuda.is_available() else f'present but --device {device.type}'
        skipped.append(f'CUDA: {reason}, skipped GPU timings (cudnn.benchmark, channels_last on GPU, '
                       'torch.cuda.max_memory_allocated per measurement; peak RSS used instead)')
    if device.type == 'cpu':
        skipped.append('MPS: not measured (CPU run)')
    return skipped


def print_table(title, header, rows):
    print(f'\n{title}')
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for row in [header, *rows]:
        print('  ' + '  '.join(str(cell).rjust(width) for cell, width in zip(row, widths)))


def network_scale(entry):
    return entry['generator_config']['ngf'] * entry['generator_config']['n_res_blocks']


def summarize(entries, matmul, amp):
    """The headline figures: the largest trained size, and the default generator at inference."""
    training = [e for e in entries['training'] if (e['precision'] != 'float32') == amp]
    inference = [e for e in entries['inference'] if (e['precision'] != 'float32') == amp]
    summary = {}
    if training:
        train = max(training, key=network_scale)
        summary.update(train_step_speedup=train['train_step_speedup'],
                       train_samples_per_s=train['train_samples_per_s'],
                       reference_train_samples_per_s=train['reference_samples_per_s'],
                       train_measured_at=f'{train["size"]} networks, {train["image_size"]}x{train["image_size"]}, '
                                         f'batch {train["batch"]}, {train["precision"]}')
    if inference:
        infer = max(inference, key=network_scale)
        rate = matmul[matmul_dtype_of(infer['precision'])]
        summary.update(batched_inference_speedup=infer['batched_inference_speedup'],
                       inference_slices_per_s=infer['inference_slices_per_s'],
                       single_slices_per_s=infer['single_slices_per_s'],
                       forward_gflops=infer['forward_gflops_best'],
                       matmul_fraction=infer['forward_gflops_best'] / rate,
                       single_matmul_fraction=infer['single_forward_gflops_best'] / rate,
                       inference_measured_at=f'{infer["size"]} generator, {infer["image_size"]}x{infer["image_size"]},'
                                             f' batch {infer["batch"]}, {infer["precision"]}')
    return summary


def print_report(entries, matmul, config, device):
    """The two tables, and a warning when other processes shared the CPU during the timings."""
    share_header = ['CPU share'] if device.type == 'cpu' else []
    share = lambda e: [f'{e["cpu_share"]:.0%}'] if device.type == 'cpu' else []  # noqa: E731
    print_table(f'inference: harmonize_slices, {config.image_size}x{config.image_size}, one-by-one = batch size 1 '
                '(medians; GFLOP/s of the best batched call)',
                ['size', 'precision', 'batch', 'batched sl/s', 'one-by-one sl/s', 'speedup', 'GFLOP/s',
                 'of best matmul', 'one-by-one of best matmul', 'peak MiB', *share_header],
                [[e['size'], e['precision'], e['batch'], f'{e["inference_slices_per_s"]:.2f}',
                  f'{e["single_slices_per_s"]:.2f}', f'{e["batched_inference_speedup"]:.2f}x',
                  f'{e["forward_gflops_best"]:.1f}',
                  f'{e["forward_gflops_best"] / matmul[matmul_dtype_of(e["precision"])]:.0%}',
                  f'{e["single_forward_gflops_best"] / matmul[matmul_dtype_of(e["precision"])]:.0%}',
                  f'{e["peak_memory_mib_batched"]:.0f}', *share(e)] for e in entries['inference']])
    print_table('training: one generator step + one discriminator step (medians)',
                ['size', 'precision', 'batch', 'ours samples/s', 'reference samples/s', 'speedup', 'ours s/step',
                 'ref s/step', 'peak MiB ours', 'peak MiB ref', *share_header],
                [[e['size'], e['precision'], e['batch'], f'{e["train_samples_per_s"]:.3f}',
                  f'{e["reference_samples_per_s"]:.3f}', f'{e["train_step_speedup"]:.2f}x', f'{e["ours_step_s"]:.2f}',
                  f'{e["reference_step_s"]:.2f}', f'{e["peak_memory_mib_ours"]:.0f}',
                  f'{e["peak_memory_mib_reference"]:.0f}', *share(e)] for e in entries['training']])
    print(f'peak memory: {memory_kind(device)}')
    shared = [e['cpu_share'] for e in entries['inference'] + entries['training']]
    if device.type == 'cpu' and min(shared) < 0.85:
        print(f'warning: this process got as little as {min(shared):.0%} of its {torch.get_num_threads()} threads\' '
              'CPU time: other processes were using the cores, so timings are slow, and the speedups (which come '
              'partly from running fewer, larger ops) come out larger than on an idle machine; rerun when idle')


def check_targets(result):
    """The figures this code is expected to reach (float32), and whether this run reached them."""
    targets = {'train_step_speedup': 1.3, 'batched_inference_speedup': 2.0, 'matmul_fraction': 0.7}
    return {figure: {'value': result[figure], 'target': target, 'met': result[figure] >= target}
            for figure, target in targets.items() if figure in result}


def main(argv=None):
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    keep_freed_memory()  # as train.py and inference_nii.py do
    for option in ('image_size', 'train_batch', 'infer_batch', 'single_slices', 'matmul_size', 'threads'):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise UserError(f'--{option} must be at least 1')
    if args.min_run_time is not None and not args.min_run_time > 0:
        raise UserError('--min_run_time must be positive')
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # as train.py does
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    config = argparse.Namespace(
        image_size=args.image_size,
        # train.py's default batch and a batch that fills a GPU; small ones on the CPU, where they are fastest
        train_batch=args.train_batch or (16 if device.type == 'cuda' else 2),
        infer_batch=args.infer_batch or (64 if device.type == 'cuda' else 8 if args.quick else 16),
        single_slices=args.single_slices or (4 if args.quick else 8),
        min_run_time=args.min_run_time or (4.0 if args.quick else 15.0))
    config.single_slices = min(config.single_slices, config.infer_batch)
    train_sizes = parse_sizes(args.train_sizes or ('cpu' if args.quick else 'cpu,default'), '--train_sizes')
    infer_sizes = parse_sizes(args.infer_sizes, '--infer_sizes')
    amp = args.amp and amp_supported(device)
    precisions = [False, True] if amp else [False]
    matmul_n = args.matmul_size or (4096 if device.type == 'cuda' else 2048)

    print(f'device: {device} ({device_description(device)}), torch {torch.__version__}, '
          f'{torch.get_num_threads()} threads, {os.cpu_count()} CPUs'
          + (', channels_last' if args.channels_last else ''))
    skipped = skipped_parts(device)
    if args.amp and not amp:
        skipped.append('--amp: this CPU has no bfloat16 instructions (AVX-512 BF16 or AMX), so autocast would '
                       'use a slow generic kernel; skipped the autocast entries')
    for line in skipped:
        print(line)
    print(f'training at: {", ".join(map(describe, train_sizes))}; {args.image_size}x{args.image_size}, '
          f'batch {config.train_batch}; {config.min_run_time:g} s of timed steps per side after one warm-up step')
    print(f'inference at: {", ".join(map(describe, infer_sizes))}; harmonize_slices with batch '
          f'{config.infer_batch} vs batch 1 over {config.single_slices} slices; {config.min_run_time:g} s of timed '
          'calls per side after one warm-up call')
    if device.type == 'cuda':
        # cuDNN convolutions may use TF32 in "float32" while matmuls do not, which lifts matmul_fraction.
        print(f'TF32: matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN {torch.backends.cudnn.allow_tf32}; '
              'cudnn.benchmark on (as train.py)')

    # Each precision's forward is compared with the matmul rate of its own dtype.
    matmul_dtypes = [torch.float32] + ([autocast_dtype(device)] if amp else [])
    matmul = {dtype_name(dtype): matmul_rate(matmul_n, dtype, device, config.min_run_time / 2)
              for dtype in matmul_dtypes}
    for name, rate in matmul.items():
        print(f'matmul {matmul_n}x{matmul_n} {name}: best {rate:.1f} GFLOP/s')
    flops = {size: forward_flops(size, args.image_size) for size in dict.fromkeys([*train_sizes, *infer_sizes])}
    for name, value in flops.items():
        print(f'generator forward, {describe(name)}: {value / 1e9:.2f} GFLOP per '
              f'{args.image_size}x{args.image_size} slice (multiply-add = 2)')

    training_gflop = {size: describe_training_flops(size, config) for size in train_sizes}

    entries = {'inference': [], 'training': []}
    for amp in precisions:
        for size in infer_sizes:
            entries['inference'].append(measure_inference(size, config, device, amp, memory_format, flops[size]))
        for size in train_sizes:
            entries['training'].append(measure_training(size, config, device, amp, args.channels_last))

    print_report(entries, matmul, config, device)
    profiles = {}
    if args.profile:
        for amp in precisions:
            for size in infer_sizes:
                name = f'{size} {amp_description(amp, device)}'
                profiles[name] = profile_forward(size, config, device, amp, memory_format)
                print_table(f'profile: one forward of the {size} generator, batch {config.infer_batch}, '
                            f'{amp_description(amp, device)} (self time)', ['layers', 'ms/slice', 'share'],
                            [[kind, f'{ms:.1f}', f'{share:.1%}'] for kind, ms, share in profiles[name]])

    result = {'device': str(device), 'device_name': device_description(device), 'torch': torch.__version__,
              'threads': torch.get_num_threads(), 'quick': args.quick, 'channels_last': args.channels_last,
              'min_run_time_s': config.min_run_time,
              **summarize(entries, matmul, amp=False),
              'matmul_gflops': matmul, 'matmul_size': matmul_n,
              'forward_gflop_per_slice': {name: value / 1e9 for name, value in flops.items()},
              'train_step_gflop_per_sample': training_gflop,
              'peak_memory_mib': peak_memory_mib(device), 'peak_memory_kind': memory_kind(device),
              'cpu_share_min': min(e['cpu_share'] for e in entries['inference'] + entries['training']),
              'skipped': skipped, **entries}
    if amp:
        result['amp'] = summarize(entries, matmul, amp=True)
    if profiles:
        result['profile_ms_per_slice'] = {name: {kind: ms for kind, ms, _ in rows} for name, rows in profiles.items()}
    result['targets'] = check_targets(result)
    for figure, target in result['targets'].items():
        print(f'target {figure} >= {target["target"]}: {target["value"]:.2f} '
              f'{"met" if target["met"] else "MISSED"}')
    result['wall_s'] = time.perf_counter() - started
    print(f'wall time: {result["wall_s"]:.0f} s')
    print(json.dumps(result))


if __name__ == '__main__':
    run_cli(main)
