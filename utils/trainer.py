"""CycleGANTrainer: two generators and two discriminators trained on paired vendor slices.

Reads as: build, then for each epoch `train_epoch` and `eval_epoch`; each batch is one `step`
whose losses come from utils.losses.generator_losses.
"""
import math
import os
import random
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from dataset.dataset import Paired_Dataset, VendorDraws
from model.discriminator import Discriminator
from model.generator import build_generator, generator_config
from utils import results
from utils.checkpoint import (atomic_save, atomic_write_json, discriminator_filename, generator_checkpoint,
                              generator_filename, plain_state_dict, vendor_tags)
from utils.device import autocast, autocast_dtype, resolve_amp
from utils.distributed import ProcessGroupInfo, ShardSampler, all_reduce_sum
from utils.arguments import resolve_matching_weight
from utils.errors import UserError
from utils.losses import (DEFAULT_MATCHING_WEIGHT, TERMS, MatchingTargets, discriminator_loss, full_weights,
                          gan_part, generator_losses, lazy_weights, scheduled_weights)
from utils.metrics import DistributionMetrics, SetMetrics

NETWORKS = ('G_AB', 'G_BA', 'D_A', 'D_B')
# Without eval pairs, an epoch is "best" when it brings the harmonized intensity distribution closest to the target
# vendor's while its output keeps at least this share of the highest mutual information with its input seen so far
# (the anatomy figure minus 1, its value for an unrelated image): an output that matches the target's histogram by
# inventing texture loses what it shares with its input.
ANATOMY_SHARE_KEPT = 0.5


def lr_factor(epoch_progress, decay_epoch, total_epoch):
    """1 until decay_epoch (fractional epochs done), then linear to 0 at total_epoch."""
    if epoch_progress <= decay_epoch:
        return 1.0
    return max(0.0, 1.0 - (epoch_progress - decay_epoch) / (total_epoch - decay_epoch))


def init_weights(module):
    """N(0, 0.02) convolution weights, as the reference CycleGAN; zeros for a layer marked zero_init (the last
    layer of a residual generator, which then starts as the identity)."""
    if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
        if getattr(module, 'zero_init', False):
            torch.nn.init.zeros_(module.weight)
        else:
            torch.nn.init.normal_(module.weight, 0.0, 0.02)
        torch.nn.init.zeros_(module.bias)


def set_requires_grad(networks, flag):
    for network in networks:
        for parameter in network.parameters():
            parameter.requires_grad_(flag)


def rng_state(shuffle_generator):
    numpy_state = np.random.get_state()
    return {'torch': torch.get_rng_state(), 'python': random.getstate(), 'shuffle': shuffle_generator.get_state(),
            'numpy': [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]]}


def set_rng_state(state, shuffle_generator):
    torch.set_rng_state(state['torch'])
    random.setstate(state['python'])
    shuffle_generator.set_state(state['shuffle'])
    kind, keys, *rest = state['numpy']
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))


def figures(metric):
    """The loss.csv figures of one direction: SSIM and PSNR with eval pairs, the reference-free ones without;
    the others NaN (an empty cell), never a made-up number."""
    if isinstance(metric, SetMetrics):
        return {'SSIM': metric.ssim, 'PSNR': metric.psnr, 'VendorDistance': math.nan, 'Anatomy': math.nan}
    return {'SSIM': math.nan, 'PSNR': math.nan, 'VendorDistance': metric.vendor_distance, 'Anatomy': metric.anatomy}


def describe(metric):
    if isinstance(metric, SetMetrics):
        return f'SSIM {metric.ssim:.4f}  PSNR {metric.psnr:.2f} dB'
    return f'vendor distance {metric.vendor_distance:.4f}  anatomy {metric.anatomy:.4f}'


class WallClock:
    """The trainer's clock: seconds as they pass, whatever a step computes. A clock is what --max_minutes
    counts; experiments/nominal_clock.py gives the trainer one that counts a nominal cost per step instead."""

    def now(self):
        return time.perf_counter()

    def step_done(self, weights):
        """Called after each optimizer step with the loss weights it used."""


class CycleGANTrainer:
    def __init__(self, args, device, experiment_dir, process=None, build_data=True, clock=None,
                 generator_options=None):
        """build_data=False: networks and optimizers only, for callers that feed step() themselves.
        clock: what --max_minutes counts (WallClock by default). generator_options: build_generator's options
        that change no weight (experiments/amp_precision.py)."""
        self.args, self.device, self.experiment_dir = args, device, experiment_dir
        self.clock = clock or WallClock()
        self.generator_options = generator_options or {}
        self.process = process or ProcessGroupInfo()
        self.vendor_A, self.vendor_B = args.vendor1, args.vendor2
        self.tags = vendor_tags(args.vendor1, args.vendor2)
        self.model_dir = os.path.join(experiment_dir, 'model')
        self.loss_csv = os.path.join(experiment_dir, 'loss', 'loss.csv')
        self.amp = resolve_amp(args.amp, device)
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

        random.seed(args.random_seed)
        np.random.seed(args.random_seed)
        torch.manual_seed(args.random_seed)
        if build_data:
            self._build_data()
        elif args.oml_weight is None:
            args.oml_weight = DEFAULT_MATCHING_WEIGHT
        self._build_networks()
        if build_data and args.intensity_curve:  # a resumed run then loads the curves it was trained with
            self._fit_intensity_curves()
        self.start_epoch = 1
        self.best = {}  # direction -> {'epoch': N, 'ssim': value} (with eval pairs) or reference-free figures
        self.train_seconds = 0.0
        self.steps = 0  # optimizer steps taken by this process in this run

    # ---- build -------------------------------------------------------------------------------
    def _build_data(self):
        args, process = self.args, self.process
        common = dict(data_root=args.data_root, vendor1=args.vendor1, vendor2=args.vendor2,
                      lower_bound=args.lower_bound, upper_bound=args.upper_bound, progress=process.is_main)
        self.train_set = Paired_Dataset(split='trainset', **common)
        self.eval_set = Paired_Dataset(split='evalset', **common)
        if self.train_set.image_size != self.eval_set.image_size:
            raise UserError(f'{args.data_root}: trainset slices are {self.train_set.image_size} but evalset slices '
                            f'are {self.eval_set.image_size}; regenerate the dataset with one --image_size')
        resolve_matching_weight(args, self.train_set.n_pairs, os.path.join(args.data_root, 'trainset'))
        self.shuffle_generator = torch.Generator().manual_seed(args.random_seed)
        if not self.train_set.all_paired:  # each vendor's pool drawn on its own
            pool_sizes = [len(pool) for pool in self.train_set.pool.values()]
            pool_depths = [[self.train_set.depths[i] for i in pool] for pool in self.train_set.pool.values()]
            partner_A = self.train_set.partner[self.vendor_A]
            pairs = [(k, int(partner)) for k, partner in enumerate(partner_A) if partner >= 0]
            self.train_sampler = VendorDraws(pool_sizes, args.random_seed, process.rank, process.world_size,
                                             pool_depths=pool_depths if args.match_depth else None,
                                             pairs=pairs, pair_share=args.pair_share)
        elif process.distributed:
            self.train_sampler = DistributedSampler(self.train_set, process.world_size, process.rank,
                                                    shuffle=True, seed=args.random_seed)
        else:
            self.train_sampler = RandomSampler(self.train_set, generator=self.shuffle_generator)
        loader = dict(batch_size=args.batch_size, num_workers=args.num_workers,
                      pin_memory=self.device.type == 'cuda', persistent_workers=args.num_workers > 0)
        self.train_loader = DataLoader(self.train_set, sampler=self.train_sampler, **loader)
        if self.eval_set.all_paired:
            eval_sampler = ShardSampler(len(self.eval_set), process.rank, process.world_size)
        else:
            eval_sampler = VendorDraws([len(pool) for pool in self.eval_set.pool.values()], rank=process.rank,
                                       world_size=process.world_size, shuffle=False)
        self.eval_loader = DataLoader(self.eval_set, **loader, sampler=eval_sampler)

    def _build_networks(self):
        args = self.args
        self.nets = {
            'G_AB': build_generator(generator_config(args), **self.generator_options),
            'G_BA': build_generator(generator_config(args), **self.generator_options),
            'D_A': Discriminator(ndf=args.ndf, n_layers=args.d_layers),
            'D_B': Discriminator(ndf=args.ndf, n_layers=args.d_layers),
        }
        for net in self.nets.values():
            net.apply(init_weights)
            net.to(self.device, memory_format=self.memory_format)
        # The networks each step calls: compiled and/or wrapped for DDP. self.nets keeps the plain modules,
        # which evaluation, samples, checkpoints and the generator step's discriminator calls use.
        self.train_nets = dict(self.nets)
        if args.compile:
            self.train_nets = {name: torch.compile(net) for name, net in self.train_nets.items()}
        if self.process.distributed:
            device_ids = [self.device.index] if self.device.type == 'cuda' else None
            self.train_nets = {name: DistributedDataParallel(net, device_ids=device_ids)
                               for name, net in self.train_nets.items()}
        betas = (0.5, args.beta2)
        self.optimizer_G = torch.optim.Adam(list(self.nets['G_AB'].parameters()) + list(self.nets['G_BA'].parameters()),
                                            lr=args.learning_rate, betas=betas)
        self.optimizer_D = torch.optim.Adam(list(self.nets['D_A'].parameters()) + list(self.nets['D_B'].parameters()),
                                            lr=args.learning_rate, betas=betas)
        fp16 = self.amp and autocast_dtype(self.device) == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)

    def _fit_intensity_curves(self):
        """Each generator's intensity curve from the training slices of its input and its output vendor."""
        values_A = self.train_set.foreground_values(self.vendor_A)
        values_B = self.train_set.foreground_values(self.vendor_B)
        self.nets['G_AB'].set_intensity_curve(values_A, values_B)
        self.nets['G_BA'].set_intensity_curve(values_B, values_A)

    # ---- state -------------------------------------------------------------------------------
    def state(self, epoch):
        """Everything needed to continue exactly after `epoch`."""
        return {
            'epoch': epoch,
            'networks': {name: plain_state_dict(net) for name, net in self.nets.items()},
            'generator_config': self.nets['G_AB'].config,
            'optimizer_G': self.optimizer_G.state_dict(),
            'optimizer_D': self.optimizer_D.state_dict(),
            'scaler': self.scaler.state_dict(),
            'best': self.best,
            'train_seconds': self.train_seconds,
            'rng': rng_state(self.shuffle_generator),
            'args': vars(self.args),
        }

    def load_state(self, state):
        for name, net in self.nets.items():
            net.load_state_dict(state['networks'][name])
        self.optimizer_G.load_state_dict(state['optimizer_G'])
        self.optimizer_D.load_state_dict(state['optimizer_D'])
        self.scaler.load_state_dict(state['scaler'])
        self.best = state['best']
        self.train_seconds = state['train_seconds']
        set_rng_state(state['rng'], self.shuffle_generator)
        self.start_epoch = state['epoch'] + 1

    # ---- training ----------------------------------------------------------------------------
    def epoch_progress(self, epoch, iteration):
        """Fractional epochs done: by iterations, or by time spent when --max_minutes is set."""
        if self.args.max_minutes:
            return self.args.total_epoch * self.train_seconds / (60 * self.args.max_minutes)
        return epoch - 1 + iteration / len(self.train_loader)

    def epoch_label(self, epoch):
        if self.args.max_minutes:
            return f'epoch {epoch} ({self.train_seconds / 60:.1f}/{self.args.max_minutes:g} min)'
        return f'epoch {epoch}/{self.args.total_epoch}'

    def time_is_up(self):
        return bool(self.args.max_minutes) and self.train_seconds >= 60 * self.args.max_minutes

    def _sync_clock(self):
        """Under torchrun with --max_minutes, every process follows the slowest one's clock, so all
        take the same learning rate and loss weights and stop at the same iteration."""
        if self.process.distributed and self.args.max_minutes:
            clock = torch.tensor([self.train_seconds], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(clock, op=torch.distributed.ReduceOp.MAX)
            self.train_seconds = float(clock)

    def _to_device(self, batch):
        return [x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format) for x in batch]

    def _unpack(self, batch):
        """(real_A, real_B, MatchingTargets or None) on the device: a batch of pairs, or of independent draws
        with the other vendor's scan of each slice where there is one (see Paired_Dataset)."""
        if len(batch) == 2:
            return (*self._to_device(batch), None)
        real_A, real_B, target_B, has_B, target_A, has_A = batch
        real_A, real_B, target_B, target_A = self._to_device((real_A, real_B, target_B, target_A))
        return real_A, real_B, MatchingTargets(target_B, has_B.to(self.device), target_A, has_A.to(self.device))

    def step(self, real_A, real_B, weights, matching=None):
        """One optimizer step of the generators, then of the discriminators on the same (detached) fakes."""
        nets, plain = self.train_nets, self.nets
        set_requires_grad([plain['D_A'], plain['D_B']], False)
        with autocast(self.device, self.amp):
            terms, fake_A, fake_B = generator_losses(real_A, real_B, nets['G_AB'], nets['G_BA'], plain['D_A'],
                                                     plain['D_B'], weights, self.args.real_label, self.args.gan_slices,
                                                     matching)
            loss_G = weights.weighted_total(terms)
        self.optimizer_G.zero_grad(set_to_none=True)
        self.scaler.scale(loss_G).backward()
        self.scaler.step(self.optimizer_G)
        loss_D = torch.zeros((), device=self.device)
        if weights.adv:
            set_requires_grad([plain['D_A'], plain['D_B']], True)
            with autocast(self.device, self.amp):
                part = gan_part(self.args.gan_slices)
                loss_D = (discriminator_loss(nets['D_A'], real_A[part], fake_A[part], self.args.real_label)
                          + discriminator_loss(nets['D_B'], real_B[part], fake_B[part], self.args.real_label))
            self.optimizer_D.zero_grad(set_to_none=True)
            self.scaler.scale(loss_D).backward()
            self.scaler.step(self.optimizer_D)
        self.scaler.update()
        return loss_G.detach(), terms, loss_D.detach() / 2, fake_A, fake_B

    def _set_learning_rate(self, progress):
        lr = self.args.learning_rate * lr_factor(progress, self.args.decay_epoch, self.args.total_epoch)
        for optimizer in (self.optimizer_G, self.optimizer_D):
            for group in optimizer.param_groups:
                group['lr'] = lr
        return lr

    def train_epoch(self, epoch):
        """One pass over the training set (cut short when --max_minutes runs out); mean loss terms."""
        for net in self.nets.values():
            net.train()
        if hasattr(self.train_sampler, 'set_epoch'):
            self.train_sampler.set_epoch(epoch)
        sums = torch.zeros(len(TERMS) + 3, device=self.device, dtype=torch.float64)
        bar = tqdm(self.train_loader, desc=f'{self.epoch_label(epoch)} train', unit='batch',
                   disable=not self.process.is_main, leave=False, dynamic_ncols=True)
        for iteration, batch in enumerate(bar):
            started = self.clock.now()
            self._sync_clock()
            if self.time_is_up():
                break
            progress = self.epoch_progress(epoch, iteration)
            lr = self._set_learning_rate(progress)
            weights = lazy_weights(scheduled_weights(self.args, progress), iteration, self.args.gan_every)
            real_A, real_B, matching = self._unpack(batch)
            loss_G, terms, loss_D, fake_A, fake_B = self.step(real_A, real_B, weights, matching)
            self.clock.step_done(weights)
            batch = real_A.shape[0]
            sums[:-1] += torch.stack([loss_G + loss_D, *(terms[t] for t in TERMS), loss_D]).double() * batch
            sums[-1] += batch
            self.train_seconds += self.clock.now() - started  # logging and samples below do not count
            self.steps += 1
            if (iteration + 1) % self.args.log_freq == 0 or iteration == 0:
                self._check_finite(sums, epoch, iteration)
                if self.process.is_main:
                    means = (sums[:-1] / sums[-1]).tolist()
                    tqdm.write(f'epoch {epoch} iter {iteration + 1}/{len(self.train_loader)}  lr {lr:.2e}  '
                               + '  '.join(f'{name} {value:.4f}' for name, value in
                                           zip(('Total', *TERMS, 'Discriminator'), means)))
            if self.process.is_main and iteration % self.args.sample_save_freq == 0:
                self.save_samples(real_A, real_B, os.path.join(self.experiment_dir, 'sample', f'epoch_{epoch}',
                                                               f'iter_{iteration}.png'))
        all_reduce_sum(sums)
        self._check_finite(sums, epoch, len(self.train_loader))
        return dict(zip(('Total', *TERMS, 'Discriminator'), (sums[:-1] / sums[-1]).tolist()))

    def _check_finite(self, sums, epoch, iteration):
        if not torch.isfinite(sums).all():
            last = os.path.join(self.model_dir, 'last.pth')
            raise UserError(f'training diverged (a loss is NaN/inf) in epoch {epoch} by iteration {iteration + 1}; '
                            f'the last good state is {last} (epoch {epoch - 1}); '
                            'lower --learning_rate or drop --amp and --resume', exit_code=1)

    @torch.no_grad()
    def save_samples(self, real_A, real_B, path):
        """Grid of A, A->B, A->B->A, B, B->A, B->A->B for up to 4 slices of a batch."""
        real_A, real_B = real_A[:4], real_B[:4]
        G_AB, G_BA = self.nets['G_AB'], self.nets['G_BA']
        with autocast(self.device, self.amp):
            fake_B, fake_A = G_AB(real_A), G_BA(real_B)
            columns = [real_A, fake_B, G_BA(fake_B), real_B, fake_A, G_AB(fake_A)]
        a, b = self.vendor_A, self.vendor_B
        titles = [a, f'{a}→\n{b}', f'{a}→{b}\n→{a}', b, f'{b}→\n{a}', f'{b}→{a}\n→{b}']
        results.save_sample_grid(columns, titles, path)

    # ---- evaluation --------------------------------------------------------------------------
    @torch.inference_mode()
    def eval_epoch(self, epoch):
        """Loss terms at full weight over the whole eval set; SSIM/PSNR in both directions over its pairs; without
        pairs, the reference-free figures (DistributionMetrics) instead."""
        for net in self.nets.values():
            net.eval()
        weights = full_weights(self.args)
        sums = torch.zeros(len(TERMS) + 3, device=self.device, dtype=torch.float64)
        with_pairs = self.eval_set.n_pairs > 0
        metrics = {'A2B': SetMetrics(), 'B2A': SetMetrics()} if with_pairs else \
            {'A2B': DistributionMetrics(), 'B2A': DistributionMetrics()}
        nets = self.nets
        seen = {'A': set(), 'B': set()}  # the smaller pool repeats in the draws: count each slice once
        items = [] if with_pairs or self.eval_set.all_paired else self.eval_loader.sampler.items()
        for index, batch in enumerate(tqdm(self.eval_loader, desc=f'{self.epoch_label(epoch)} eval', unit='batch',
                                           disable=not self.process.is_main, leave=False, dynamic_ncols=True)):
            real_A, real_B, matching = self._unpack(batch)
            with autocast(self.device, self.amp):
                terms, fake_A, fake_B = generator_losses(real_A, real_B, nets['G_AB'], nets['G_BA'], nets['D_A'],
                                                         nets['D_B'], weights, self.args.real_label,
                                                         matching=matching)
                if fake_A is None:
                    fake_B, fake_A = nets['G_AB'](real_A), nets['G_BA'](real_B)
                loss_D = torch.zeros((), device=self.device)
                if weights.adv:
                    loss_D = (discriminator_loss(nets['D_A'], real_A, fake_A, self.args.real_label)
                              + discriminator_loss(nets['D_B'], real_B, fake_B, self.args.real_label)) / 2
            batch = real_A.shape[0]
            total = weights.weighted_total(terms) + loss_D
            sums[:-1] += torch.stack([total, *(terms[t] for t in TERMS), loss_D]).double() * batch
            sums[-1] += batch
            if matching is None:
                metrics['A2B'].update(fake_B, real_B)
                metrics['B2A'].update(fake_A, real_A)
            elif with_pairs:
                metrics['A2B'].update(fake_B[matching.has_B], matching.target_B[matching.has_B])
                metrics['B2A'].update(fake_A[matching.has_A], matching.target_A[matching.has_A])
            else:
                batch_items = items[index * self.args.batch_size:(index + 1) * self.args.batch_size]
                new_A = [i for i, (k, _) in enumerate(batch_items) if k not in seen['A']]
                new_B = [i for i, (_, k) in enumerate(batch_items) if k not in seen['B']]
                seen['A'].update(k for k, _ in batch_items)
                seen['B'].update(k for _, k in batch_items)
                metrics['A2B'].update(real_A[new_A], fake_B[new_A])
                metrics['B2A'].update(real_B[new_B], fake_A[new_B])
                metrics['A2B'].update_target(real_B[new_B])
                metrics['B2A'].update_target(real_A[new_A])
        all_reduce_sum(sums)
        for direction, metric in metrics.items():
            metric.add_tensor(all_reduce_sum(metric.as_tensor().to(self.device)).cpu())
        losses = dict(zip(('Total', *TERMS, 'Discriminator'), (sums[:-1] / sums[-1]).tolist()))
        return losses, metrics

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self):
        """Train epoch after epoch: --total_epoch of them, or, with --max_minutes, as many as fit in that time."""
        args = self.args
        if args.max_minutes and self.time_is_up():
            raise UserError(f'{self.experiment_dir} has already trained for --max_minutes {args.max_minutes:g}; '
                            'pass a larger --max_minutes to train further')
        if not args.max_minutes and self.start_epoch > args.total_epoch:
            raise UserError(f'{self.experiment_dir} already has {self.start_epoch - 1} epochs; '
                            f'pass a --total_epoch above {self.start_epoch - 1} to train further')
        epoch = self.start_epoch
        while True:
            train_losses = self.train_epoch(epoch)
            eval_losses, metrics = self.eval_epoch(epoch)
            self._sync_clock()
            if args.max_minutes:
                last = self.time_is_up() or epoch == args.stop_after_epoch
            else:
                last = epoch in (args.total_epoch, args.stop_after_epoch)
            if self.process.is_main:
                self.record_epoch(epoch, train_losses, eval_losses, metrics,
                                  save_networks=last or epoch % args.save_freq == 0)
            if last:
                break
            epoch += 1
        self.check_replicas_agree()
        return epoch

    def check_replicas_agree(self):
        """Under torchrun, confirm every process ends with the same weights (DDP keeps them in step)."""
        if not self.process.distributed:
            return
        sums = torch.stack([p.detach().double().sum() for net in self.nets.values() for p in net.parameters()])
        low, high = sums.clone(), sums.clone()
        torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise UserError('the processes ended with different weights; please report this with your torchrun command',
                            exit_code=1)
        if self.process.is_main:
            print(f'network weights identical on all {self.process.world_size} processes')

    def record_epoch(self, epoch, train_losses, eval_losses, metrics, save_networks):
        """loss.csv row, loss.png, checkpoints of this epoch, the best generators, model/last.pth and summary.json."""
        row = {'epoch': epoch}
        row.update({f'Train {k}': v for k, v in train_losses.items()})
        row.update({f'Eval {k}': v for k, v in eval_losses.items()})
        for direction, metric in metrics.items():
            for name, value in figures(metric).items():
                row[f'Eval {name} {direction}'] = value
        table = results.append_epoch(self.loss_csv, row)
        results.plot_losses(table, os.path.join(self.experiment_dir, 'loss', 'loss.png'))
        a, b = self.vendor_A, self.vendor_B
        generators = {'A2B': ('G_AB', a, b), 'B2A': ('G_BA', b, a)}
        if save_networks:
            for name, source, target in generators.values():
                atomic_save(generator_checkpoint(self.nets[name]),
                            os.path.join(self.model_dir, generator_filename(self.tags, source, target, epoch)))
            for name, vendor in (('D_A', a), ('D_B', b)):
                atomic_save(plain_state_dict(self.nets[name]),
                            os.path.join(self.model_dir, discriminator_filename(self.tags, vendor, epoch)))
        for direction, (name, source, target) in generators.items():
            if self._is_best(direction, epoch, metrics[direction]):
                atomic_save(generator_checkpoint(self.nets[name]),
                            os.path.join(self.model_dir, generator_filename(self.tags, source, target, 'best')))
        atomic_write_json(self.best, os.path.join(self.model_dir, 'best.json'))
        atomic_save(self.state(epoch), os.path.join(self.model_dir, 'last.pth'))
        # what scripts driving train.py read (experiments/quality.py), as of the epoch last.pth holds
        atomic_write_json({'last_epoch': epoch, 'steps_this_run': self.steps, 'train_seconds': self.train_seconds,
                           'vendors': {'A': a, 'B': b},
                           'eval': {direction: {key.lower(): value for key, value in figures(metric).items()}
                                    for direction, metric in metrics.items()},
                           'best': self.best}, os.path.join(self.experiment_dir, 'summary.json'))
        tqdm.write(f'epoch {epoch}: train Total {train_losses["Total"]:.4f}  eval Total {eval_losses["Total"]:.4f}  '
                   + '  '.join(f'{label} {arrow}' for label, arrow in
                               ((f'{a}→{b}', describe(metrics['A2B'])), (f'{b}→{a}', describe(metrics['B2A']))))
                   + ('' if isinstance(metrics['A2B'], SetMetrics) else '  (no eval pairs: reference-free figures)'))

    def _is_best(self, direction, epoch, metric):
        """Record epoch as the direction's best if it is: the highest eval SSIM over the eval pairs; without pairs,
        the lowest vendor distance among epochs that keep ANATOMY_SHARE_KEPT of the highest anatomy figure seen."""
        best = self.best.get(direction, {})
        if isinstance(metric, SetMetrics):
            if not (math.isfinite(metric.ssim) and metric.ssim > best.get('ssim', -math.inf)):
                return False
            self.best[direction] = {'epoch': epoch, 'ssim': metric.ssim, 'psnr': metric.psnr}
            return True
        highest_anatomy = max(metric.anatomy, best.get('highest_anatomy', -math.inf))
        best['highest_anatomy'] = highest_anatomy
        self.best[direction] = best
        kept = metric.anatomy - 1 >= ANATOMY_SHARE_KEPT * (highest_anatomy - 1)
        if not (kept and math.isfinite(metric.vendor_distance)
                and metric.vendor_distance < best.get('vendor_distance', math.inf)):
            return False
        best.update(epoch=epoch, vendor_distance=metric.vendor_distance, anatomy=metric.anatomy)
        return True
