"""Training and inference speed of the CycleGAN on whatever device is present, against the original code.

    python benchmarks/benchmark.py --quick           # under 3 minutes on a 2-core CPU
    python benchmarks/benchmark.py                   # longer, steadier figures, both network sizes
    python benchmarks/benchmark.py --quick --amp     # adds bfloat16-autocast entries (about twice the time)

It measures, with the same networks, batch and precision on both sides:
  training    samples/s of our step (utils.losses.generator_losses + discriminator_loss, as
              CycleGANTrainer.step calls them) and of the original step (every generator pass run
              separately; the discriminator step re-runs both generators without detach and back-propagates
              through them), and their ratio train_step_speedup;
  inference   slices/s of inference_nii.harmonize_slices in batches and one slice at a time, and their ratio
              batched_inference_speedup;
  efficiency  the generator's forward FLOPs per slice (FlopCounterMode, a multiply-add counts 2) and the
              achieved GFLOP/s of the batched forward as a fraction of the measured float32 matmul rate
              (matmul_fraction);
  memory      peak memory: torch.cuda.max_memory_allocated per phase on CUDA, the process's peak RSS
              (monotone over the run, so each phase's figure includes the ones before) elsewhere.

Timed calls of the two things compared alternate (A, B, A, B, ...) so that load from other processes
falls on both; each figure is the median of the timed repetitions after warm-up calls (matmul_fraction
compares the best batched forward with the best matmul). Human-readable lines first; the last line
printed is one JSON object with all the figures.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from inference_nii import harmonize_slices
from model.discriminator import Discriminator
from model.generator import Generator
from utils.cpu_memory import keep_freed_memory
from utils.device import amp_description, amp_supported, autocast, autocast_dtype, pick_device
from utils.errors import UserError, run_cli
from utils.losses import LossWeights, discriminator_loss, generator_losses
from utils.trainer import init_weights, set_requires_grad

# The weights of train.py's defaults, all terms on (the state after warm-up and ramp-up).
WEIGHTS = LossWeights(adv=1.0, ccl=5.0, identity=1.0, oml=5.0)
REAL_LABEL = 1.0
LEARNING_RATE = 2e-4
MATMULS_PER_ROUND = 5


@dataclass(frozen=True)
class Size:
    name: str
    ngf: int
    n_res_blocks: int
    ndf: int

    def describe(self):
        return f'{self.name} (ngf {self.ngf}, {self.n_res_blocks} blocks, ndf {self.ndf})'


SIZES = {'default': Size('default', 64, 9, 64),   # train.py's defaults
         'cpu': Size('cpu', 16, 6, 16)}            # recipes/cpu.args


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--device', choices=['auto', 'cpu', 'cuda', 'mps'], default='auto')
    parser.add_argument('--quick', action='store_true',
                        help='few iterations, training only the CPU-sized networks (a default-network step takes '
                             '17 s on an AVX2 2-core CPU): under 3 minutes on an idle 2-core CPU')
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
    parser.add_argument('--warmup', type=int, default=None, help='untimed calls first (default 1)')
    parser.add_argument('--repeats', type=int, default=None,
                        help='timed calls of each side (default 2 with --quick, else 4)')
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
    return [SIZES[name] for name in names]


# ---- clocks and memory ------------------------------------------------------------------------------
def synchronize(device):
    """Wait for queued GPU work, so the clock reads the work's end and not its launch."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    elif device.type == 'mps':
        torch.mps.synchronize()


def seconds(fn, device):
    synchronize(device)
    started = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - started


def warm_up(fn, calls, device):
    """Untimed calls (allocator, oneDNN/cuDNN algorithm choice); returns the peak memory they reached (MiB)."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(calls):
        fn()
    synchronize(device)
    return peak_memory_mib(device)


def alternate(fns, repeats, device):
    """Seconds of each call of each function, the functions taking turns, and the CPU share of the rounds.

    The share is this process's CPU time over wall time x threads: near 1 when it had the cores to itself
    (idle OpenMP threads spin for a while before sleeping), well below when other processes took turns
    on them, which inflates every timing and most of all those of many small ops.
    """
    times = [[] for _ in fns]
    cpu_started, wall_started = time.process_time(), time.perf_counter()
    for _ in range(repeats):
        for fn, record in zip(fns, times):
            record.append(seconds(fn, device))
    share = (time.process_time() - cpu_started) / ((time.perf_counter() - wall_started) * torch.get_num_threads())
    return times, share


def peak_memory_mib(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == 'darwin' else peak / 2 ** 10  # bytes on macOS, KiB on Linux


def memory_kind(device):
    if device.type == 'cuda':
        return 'torch.cuda.max_memory_allocated, per phase'
    return 'process peak RSS (resource.getrusage), monotone over the run: includes earlier phases'


# ---- networks and data ------------------------------------------------------------------------------
def build_networks(size, device, memory_format):
    """The trainer's four networks, initialised as it does (seeded, so every run times the same weights)."""
    torch.manual_seed(0)
    nets = {'G_AB': Generator(ngf=size.ngf, n_res_blocks=size.n_res_blocks),
            'G_BA': Generator(ngf=size.ngf, n_res_blocks=size.n_res_blocks),
            'D_A': Discriminator(ndf=size.ndf), 'D_B': Discriminator(ndf=size.ndf)}
    for net in nets.values():
        net.apply(init_weights)
        net.to(device, memory_format=memory_format)
        net.train()
    return nets


def build_optimizers(nets, device, amp):
    """The trainer's two Adam optimizers and its GradScaler (active only for float16)."""
    betas = (0.5, 0.999)
    optimizer_G = torch.optim.Adam(list(nets['G_AB'].parameters()) + list(nets['G_BA'].parameters()),
                                   lr=LEARNING_RATE, betas=betas)
    optimizer_D = torch.optim.Adam(list(nets['D_A'].parameters()) + list(nets['D_B'].parameters()),
                                   lr=LEARNING_RATE, betas=betas)
    fp16 = amp and autocast_dtype(device) == torch.float16
    return optimizer_G, optimizer_D, torch.amp.GradScaler(device.type, enabled=fp16)


def random_slices(batch, image_size, device, memory_format):
    """A batch of (batch, 1, H, W) images in [-1, 1], the generators' input range."""
    images = torch.rand(batch, 1, image_size, image_size, generator=torch.Generator().manual_seed(batch)) * 2 - 1
    return images.to(device).contiguous(memory_format=memory_format)


# ---- the two training steps -------------------------------------------------------------------------
def project_step(nets, optimizers, real_A, real_B, device, amp):
    """CycleGANTrainer.step on plain networks (no torch.compile/DDP): the same calls in the same order."""
    optimizer_G, optimizer_D, scaler = optimizers
    D_A, D_B = nets['D_A'], nets['D_B']
    set_requires_grad([D_A, D_B], False)
    with autocast(device, amp):
        terms, fake_A, fake_B = generator_losses(real_A, real_B, nets['G_AB'], nets['G_BA'], D_A, D_B,
                                                 WEIGHTS, REAL_LABEL)
        loss_G = WEIGHTS.weighted_total(terms)
    optimizer_G.zero_grad(set_to_none=True)
    scaler.scale(loss_G).backward()
    scaler.step(optimizer_G)
    set_requires_grad([D_A, D_B], True)
    with autocast(device, amp):
        loss_D = (discriminator_loss(D_A, real_A, fake_A, REAL_LABEL)
                  + discriminator_loss(D_B, real_B, fake_B, REAL_LABEL))
    optimizer_D.zero_grad(set_to_none=True)
    scaler.scale(loss_D).backward()
    scaler.step(optimizer_D)
    scaler.update()


def bce_to(logits, target):
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def l1(a, b):
    return F.l1_loss(a.float(), b.float())


def reference_step(nets, optimizers, real_A, real_B, device, amp):
    """The original step: each generator pass on its own; the discriminators are not frozen during the
    generator step; the discriminator step re-runs G_AB(A) and G_BA(B) without detach, scores real and
    fake separately, and its backward goes through both generators (whose gradients are then unused)."""
    optimizer_G, optimizer_D, scaler = optimizers
    G_AB, G_BA, D_A, D_B = nets['G_AB'], nets['G_BA'], nets['D_A'], nets['D_B']
    with autocast(device, amp):
        fake_B, fake_A = G_AB(real_A), G_BA(real_B)
        adversarial = bce_to(D_B(fake_B), REAL_LABEL) + bce_to(D_A(fake_A), REAL_LABEL)
        cycle = l1(G_BA(fake_B), real_A) + l1(G_AB(fake_A), real_B)
        identity = l1(G_AB(real_B), real_B) + l1(G_BA(real_A), real_A)
        matching = l1(fake_B, real_B) + l1(fake_A, real_A)
        loss_G = (WEIGHTS.adv * adversarial + WEIGHTS.ccl * cycle + WEIGHTS.identity * identity
                  + WEIGHTS.oml * matching)
    optimizer_G.zero_grad(set_to_none=True)
    scaler.scale(loss_G).backward()
    scaler.step(optimizer_G)
    with autocast(device, amp):
        fake_B, fake_A = G_AB(real_A), G_BA(real_B)
        loss_D = (bce_to(D_A(real_A), REAL_LABEL) + bce_to(D_A(fake_A), 0.0)
                  + bce_to(D_B(real_B), REAL_LABEL) + bce_to(D_B(fake_B), 0.0))
    optimizer_D.zero_grad(set_to_none=True)
    scaler.scale(loss_D).backward()
    scaler.step(optimizer_D)
    scaler.update()


def training_flops(size, config):
    """FLOPs per sample of our step and of the reference step (forward and backward; counted on the meta
    device, so nothing is computed). Their ratio is the speedup to expect where every FLOP costs the same."""
    meta = torch.device('meta')
    with meta:
        nets = build_networks(size, meta, torch.contiguous_format)
        real_A = torch.empty(config.train_batch, 1, config.image_size, config.image_size)
        real_B = torch.empty_like(real_A)
    flops = []
    for step in (project_step, reference_step):
        optimizers = build_optimizers(nets, torch.device('cpu'), amp=False)
        counter = FlopCounterMode(display=False)
        with counter:
            step(nets, optimizers, real_A, real_B, torch.device('cpu'), amp=False)
        flops.append(counter.get_total_flops() / config.train_batch)
    return flops


def measure_training(size, config, device, amp, memory_format):
    """Samples/s of our step and of the reference step, same networks, optimizers, batch and precision."""
    nets = build_networks(size, device, memory_format)
    optimizers = build_optimizers(nets, device, amp)
    real_A = random_slices(config.train_batch, config.image_size, device, memory_format)
    real_B = random_slices(config.train_batch + 1, config.image_size, device, memory_format)[1:]
    ours = lambda: project_step(nets, optimizers, real_A, real_B, device, amp)  # noqa: E731
    reference = lambda: reference_step(nets, optimizers, real_A, real_B, device, amp)  # noqa: E731
    # Ours warms up first: on the CPU the peak RSS is monotone, so its figure is ours alone.
    memory_ours = warm_up(ours, config.warmup, device)
    memory_reference = warm_up(reference, config.warmup, device)
    (times_ours, times_reference), cpu_share = alternate([ours, reference], config.repeats, device)
    step_ours, step_reference = statistics.median(times_ours), statistics.median(times_reference)
    return {
        'size': size.name, 'ngf': size.ngf, 'n_res_blocks': size.n_res_blocks, 'ndf': size.ndf,
        'image_size': config.image_size, 'batch': config.train_batch, 'precision': amp_description(amp, device),
        'ours_step_s': step_ours, 'reference_step_s': step_reference,
        'ours_step_s_all': times_ours, 'reference_step_s_all': times_reference,
        'train_samples_per_s': config.train_batch / step_ours,
        'reference_samples_per_s': config.train_batch / step_reference,
        'train_step_speedup': step_reference / step_ours,
        'peak_memory_mib_ours': memory_ours, 'peak_memory_mib_reference': memory_reference,
        'cpu_share': cpu_share,
    }


def describe_training_flops(size, config):
    ours, reference = training_flops(size, config)
    print(f'training step FLOPs per sample, {size.name} networks: ours {ours / 1e9:.0f} GFLOP, reference '
          f'{reference / 1e9:.0f} GFLOP (ratio {reference / ours:.2f}: the speedup where every FLOP costs the same)')
    return {'ours_gflop_per_sample': ours / 1e9, 'reference_gflop_per_sample': reference / 1e9,
            'flop_ratio': reference / ours}


# ---- inference and efficiency -----------------------------------------------------------------------
def forward_flops(size, image_size):
    """FLOPs of one generator forward on one slice, counted on the meta device (nothing is computed)."""
    with torch.device('meta'):
        generator = Generator(ngf=size.ngf, n_res_blocks=size.n_res_blocks)
        image = torch.empty(1, 1, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        generator(image)
    return counter.get_total_flops()


def matmul_operands(n, dtype, device):
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(n, n, generator=generator).to(device, dtype),
            torch.randn(n, n, generator=generator).to(device, dtype))


def matmul_rate(n, dtype, device, calls):
    """Best GFLOP/s of an n x n matmul in dtype (2 n^3 FLOPs) over several calls after one warm-up."""
    a, b = matmul_operands(n, dtype, device)
    torch.matmul(a, b)
    best = min(seconds(lambda: torch.matmul(a, b), device) for _ in range(calls))
    return 2 * n ** 3 / best / 1e9


def measure_inference(size, config, device, amp, memory_format, flops, matmul_dtype):
    """harmonize_slices slices/s in batches and one slice at a time, and the batched forward's GFLOP/s."""
    generator = build_networks(size, device, memory_format)['G_AB'].eval()
    slices = np.random.default_rng(0).random((config.infer_batch, config.image_size, config.image_size),
                                             dtype=np.float32)
    single = slices[:config.single_slices]
    batched_call = lambda: harmonize_slices(generator, slices, config.infer_batch, device, amp)  # noqa: E731
    single_call = lambda: harmonize_slices(generator, single, 1, device, amp)  # noqa: E731
    memory_single = warm_up(single_call, config.warmup, device)
    memory_batched = warm_up(batched_call, config.warmup, device)
    # A few matmuls each round give the matmul rate under the same load as the forward (a diagnostic:
    # matmul_fraction itself compares the best forward with the best matmul, as on an idle machine).
    square = matmul_operands(config.matmul_n, matmul_dtype, device)
    matmuls = lambda: [torch.matmul(*square) for _ in range(MATMULS_PER_ROUND)]  # noqa: E731
    matmuls()
    (times_batched, times_single, times_matmul), cpu_share = alternate([batched_call, single_call, matmuls],
                                                                        config.repeats, device)
    batched_rate = len(slices) / statistics.median(times_batched)
    single_rate = len(single) / statistics.median(times_single)
    return {
        'size': size.name, 'ngf': size.ngf, 'n_res_blocks': size.n_res_blocks, 'image_size': config.image_size,
        'batch': config.infer_batch, 'precision': amp_description(amp, device),
        'inference_slices_per_s': batched_rate, 'single_slices_per_s': single_rate,
        'batched_inference_speedup': batched_rate / single_rate,
        'batched_call_s_all': times_batched, 'single_loop_s_all': times_single,
        'forward_gflop_per_slice': flops / 1e9,
        'forward_gflops_median': batched_rate * flops / 1e9,
        'forward_gflops_best': len(slices) / min(times_batched) * flops / 1e9,
        'single_forward_gflops_best': len(single) / min(times_single) * flops / 1e9,
        'matmul_gflops_same_rounds': MATMULS_PER_ROUND * 2 * config.matmul_n ** 3
                                     / statistics.median(times_matmul) / 1e9,
        'peak_memory_mib_single': memory_single, 'peak_memory_mib_batched': memory_batched,
        'cpu_share': cpu_share,
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
    generator = build_networks(size, device, memory_format)['G_AB'].eval()
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
                       'torch.cuda.max_memory_allocated per phase; peak RSS used instead)')
    if device.type == 'cpu':
        skipped.append('MPS: not measured (CPU run)')
    return skipped


def print_table(title, header, rows):
    print(f'\n{title}')
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for row in [header, *rows]:
        print('  ' + '  '.join(str(cell).rjust(width) for cell, width in zip(row, widths)))


def summarize(entries, matmul, amp):
    """The headline figures: the largest trained size, and the default generator at inference."""
    training = [e for e in entries['training'] if (e['precision'] != 'float32') == amp]
    inference = [e for e in entries['inference'] if (e['precision'] != 'float32') == amp]
    summary = {}
    if training:
        train = max(training, key=lambda e: e['ngf'] * e['n_res_blocks'])
        summary.update(train_step_speedup=train['train_step_speedup'],
                       train_samples_per_s=train['train_samples_per_s'],
                       reference_train_samples_per_s=train['reference_samples_per_s'],
                       train_measured_at=f'{train["size"]} networks, {train["image_size"]}x{train["image_size"]}, '
                                         f'batch {train["batch"]}, {train["precision"]}')
    if inference:
        infer = max(inference, key=lambda e: e['ngf'] * e['n_res_blocks'])
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
                f'(median of {config.repeats}; GFLOP/s of the best batched call)',
                ['size', 'precision', 'batch', 'batched sl/s', 'one-by-one sl/s', 'speedup', 'GFLOP/s',
                 'of best matmul', 'of matmul same rounds', 'one-by-one of best matmul', 'peak MiB', *share_header],
                [[e['size'], e['precision'], e['batch'], f'{e["inference_slices_per_s"]:.2f}',
                  f'{e["single_slices_per_s"]:.2f}', f'{e["batched_inference_speedup"]:.2f}x',
                  f'{e["forward_gflops_best"]:.1f}',
                  f'{e["forward_gflops_best"] / matmul[matmul_dtype_of(e["precision"])]:.0%}',
                  f'{e["forward_gflops_median"] / e["matmul_gflops_same_rounds"]:.0%}',
                  f'{e["single_forward_gflops_best"] / matmul[matmul_dtype_of(e["precision"])]:.0%}',
                  f'{e["peak_memory_mib_batched"]:.0f}', *share(e)] for e in entries['inference']])
    print_table(f'training: one generator step + one discriminator step (median of {config.repeats})',
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
    for option in ('image_size', 'train_batch', 'infer_batch', 'single_slices', 'repeats', 'matmul_size', 'threads'):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise UserError(f'--{option} must be at least 1')
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
        warmup=args.warmup if args.warmup is not None else 1,
        repeats=args.repeats or (2 if args.quick else 4))
    config.single_slices = min(config.single_slices, config.infer_batch)
    train_sizes = parse_sizes(args.train_sizes or ('cpu' if args.quick else 'cpu,default'), '--train_sizes')
    infer_sizes = parse_sizes(args.infer_sizes, '--infer_sizes')
    amp = args.amp and amp_supported(device)
    precisions = [False, True] if amp else [False]
    matmul_n = config.matmul_n = args.matmul_size or (4096 if device.type == 'cuda' else 2048)

    print(f'device: {device} ({device_description(device)}), torch {torch.__version__}, '
          f'{torch.get_num_threads()} threads, {os.cpu_count()} CPUs'
          + (', channels_last' if args.channels_last else ''))
    skipped = skipped_parts(device)
    if args.amp and not amp:
        skipped.append('--amp: this CPU has no bfloat16 instructions (AVX-512 BF16 or AMX), so autocast would '
                       'use a slow generic kernel; skipped the autocast entries')
    for line in skipped:
        print(line)
    print(f'training at: {", ".join(s.describe() for s in train_sizes)}; {args.image_size}x{args.image_size}, '
          f'batch {config.train_batch}; {config.warmup} warm-up + {config.repeats} timed steps per side')
    print(f'inference at: {", ".join(s.describe() for s in infer_sizes)}; harmonize_slices with batch '
          f'{config.infer_batch} vs batch 1 over {config.single_slices} slices; {config.warmup} warm-up + '
          f'{config.repeats} timed calls per side')
    if device.type == 'cuda':
        # cuDNN convolutions may use TF32 in "float32" while matmuls do not, which lifts matmul_fraction.
        print(f'TF32: matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN {torch.backends.cudnn.allow_tf32}; '
              'cudnn.benchmark on (as train.py)')

    # Each precision's forward is compared with the matmul rate of its own dtype.
    matmul_dtypes = [torch.float32] + ([autocast_dtype(device)] if amp else [])
    matmul = {dtype_name(dtype): matmul_rate(matmul_n, dtype, device, 5 if args.quick else 10)
              for dtype in matmul_dtypes}
    for name, rate in matmul.items():
        print(f'matmul {matmul_n}x{matmul_n} {name}: best {rate:.1f} GFLOP/s')
    flops = {size.name: forward_flops(size, args.image_size) for size in {*train_sizes, *infer_sizes}}
    for name, value in flops.items():
        print(f'generator forward, {SIZES[name].describe()}: {value / 1e9:.2f} GFLOP per '
              f'{args.image_size}x{args.image_size} slice (multiply-add = 2)')

    training_gflop = {size.name: describe_training_flops(size, config) for size in train_sizes}

    entries = {'inference': [], 'training': []}
    for amp in precisions:
        for size in infer_sizes:
            entries['inference'].append(measure_inference(size, config, device, amp, memory_format, flops[size.name],
                                                          autocast_dtype(device) if amp else torch.float32))
        for size in train_sizes:
            entries['training'].append(measure_training(size, config, device, amp, memory_format))

    print_report(entries, matmul, config, device)
    profiles = {}
    if args.profile:
        for amp in precisions:
            for size in infer_sizes:
                name = f'{size.name} {amp_description(amp, device)}'
                profiles[name] = profile_forward(size, config, device, amp, memory_format)
                print_table(f'profile: one forward of the {size.name} generator, batch {config.infer_batch}, '
                            f'{amp_description(amp, device)} (self time)', ['layers', 'ms/slice', 'share'],
                            [[kind, f'{ms:.1f}', f'{share:.1%}'] for kind, ms, share in profiles[name]])

    result = {'device': str(device), 'device_name': device_description(device), 'torch': torch.__version__,
              'threads': torch.get_num_threads(), 'quick': args.quick, 'channels_last': args.channels_last,
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
