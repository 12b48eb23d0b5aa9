"""Training: metrics, the losses and one optimizer step, the schedules, and what train.py writes.

train.py's errors are in the bad-input battery (test_bad_inputs.py)."""
import json
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from conftest import mni_t1
from dataset.dataset import Paired_Dataset
from model.discriminator import Discriminator
from model.generator import Generator
from utils import metrics
from utils.errors import UserError
from utils.arguments import parse_arguments, resolve_matching_weight
from utils.losses import (TERMS, LossWeights, discriminator_loss, full_weights, generator_losses, lazy_weights,
                          scheduled_weights)
from utils.trainer import CycleGANTrainer, lr_factor


TINY = ['--ngf', '8', '--n_res_blocks', '2', '--ndf', '8', '--num_workers', '0', '--device', 'cpu']


def make_args(data_root, save_dir, *flags):
    return parse_arguments(['-ex', 't', '--data_root', str(data_root), '--save_dir', str(save_dir), *TINY,
                            '--lower_bound', '0.4', '--upper_bound', '0.5', '--batch_size', '2', *flags])


def make_trainer(data_root, save_dir, *flags):
    args = make_args(data_root, save_dir, *flags)
    return CycleGANTrainer(args, torch.device('cpu'), os.path.join(str(save_dir), 't'))


def first_batch(trainer):
    return next(iter(trainer.train_loader))


def snapshot(trainer):
    return {name: {k: p.detach().clone() for k, p in net.named_parameters()} for name, net in trainer.nets.items()}


# ---- metrics ----------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def mri_pairs():
    """Real axial MRI slices in [0, 1] (targets) and distorted versions of them (predictions)."""
    data = np.asarray(mni_t1(4).dataobj, dtype=np.float64)
    data = data / data.max()
    rng = np.random.default_rng(0)
    targets = np.stack([data[:, :, k] for k in range(16, 32, 3)])  # 6 slices of 50x59
    predictions = np.stack([np.clip(ndimage.gaussian_filter(t, 0.8 + 0.2 * i) ** 1.2
                                    + rng.normal(0, 0.03, t.shape), 0, 1) for i, t in enumerate(targets)])
    return predictions, targets


def test_ssim_and_psnr_equal_skimage(mri_pairs):
    predictions, targets = mri_pairs
    for p, t in zip(predictions, targets):
        assert metrics.ssim(p, t) == pytest.approx(structural_similarity(p, t, data_range=1.0), abs=1e-12)
        assert metrics.psnr(p, t) == pytest.approx(peak_signal_noise_ratio(t, p, data_range=1.0), abs=1e-9)
        assert 0 < metrics.ssim(p, t) < 1
        assert 10 < metrics.psnr(p, t) < 40
    with np.errstate(divide='ignore'):  # skimage divides by a zero error here
        assert metrics.psnr(targets[0], targets[0]) == math.inf


def test_set_metrics_over_batches_of_different_sizes(mri_pairs):
    predictions, targets = mri_pairs
    to_net = lambda x: torch.from_numpy(x[:, None].astype(np.float32)) * 2 - 1  # noqa: E731
    # the values the networks see are float32: compare against those same values
    p_unit = ((to_net(predictions).double() + 1) / 2).numpy()[:, 0]
    t_unit = ((to_net(targets).double() + 1) / 2).numpy()[:, 0]
    set_metrics = metrics.SetMetrics()
    set_metrics.update(to_net(predictions[:4]), to_net(targets[:4]))
    set_metrics.update(to_net(predictions[4:]), to_net(targets[4:]))
    expected_ssim = np.mean([structural_similarity(p, t, data_range=1.0) for p, t in zip(p_unit, t_unit)])
    expected_psnr = peak_signal_noise_ratio(t_unit, p_unit, data_range=1.0)
    assert set_metrics.ssim == pytest.approx(expected_ssim, abs=1e-6)
    assert set_metrics.psnr == pytest.approx(expected_psnr, abs=1e-4)
    # and not the mean of per-batch or per-slice PSNRs
    per_slice = np.mean([peak_signal_noise_ratio(t, p, data_range=1.0) for p, t in zip(p_unit, t_unit)])
    assert abs(set_metrics.psnr - per_slice) > 1e-3


def test_set_metrics_identical_empty_slice_keeps_psnr_finite(mri_pairs):
    predictions, targets = mri_pairs
    set_metrics = metrics.SetMetrics()
    background = -torch.ones(1, 1, 50, 59)
    set_metrics.update(background, background)  # identical empty slices: SSIM 1, squared error 0
    set_metrics.update(torch.from_numpy(predictions[:1, None]) * 2 - 1, torch.from_numpy(targets[:1, None]) * 2 - 1)
    stacked_p = np.stack([np.zeros((50, 59)), predictions[0]])
    stacked_t = np.stack([np.zeros((50, 59)), targets[0]])
    assert math.isfinite(set_metrics.psnr)
    assert set_metrics.psnr == pytest.approx(peak_signal_noise_ratio(stacked_t, stacked_p, data_range=1.0), abs=1e-6)
    assert set_metrics.ssim == pytest.approx((1 + structural_similarity(predictions[0], targets[0], data_range=1.0)) / 2,
                                             abs=1e-6)


def test_to_unit_range_maps_network_range():
    x = torch.tensor([[-1.0, 0.0, 1.0, 1.5, -3.0]])
    np.testing.assert_allclose(metrics.to_unit_range(x), [[0, 0.5, 1, 1, 0]])


# ---- the losses ---------------------------------------------------------------------------------

def test_default_weights_are_the_seed_table():
    args = parse_arguments(['-ex', 'x'])
    resolve_matching_weight(args, n_pairs=10, train_dir='trainset')  # the matching term is on where there are pairs
    weights = full_weights(args)
    assert (weights.adv, weights.ccl, weights.identity, weights.oml) == (1, 5, 1, 5)
    assert scheduled_weights(args, 0.0) == weights
    assert scheduled_weights(args, 37.5) == weights
    assert all(lazy_weights(weights, step, args.gan_every) == weights for step in range(5))  # every step


@pytest.fixture
def tiny_nets():
    torch.manual_seed(1)
    nets = (Generator(ngf=8, n_res_blocks=2), Generator(ngf=8, n_res_blocks=2), Discriminator(ndf=8),
            Discriminator(ndf=8))
    a = torch.rand(3, 1, 40, 44) * 2 - 1
    b = torch.tanh(a * 1.5 + 0.2)  # a second "vendor" related to the first
    return nets, a, b


def hand_terms(a, b, G_AB, G_BA, D_A, D_B, real_label=1.0):
    """The four terms as the docstring of utils/losses.py writes them, one plain network call each."""
    bce = lambda logits, y: F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, y))  # noqa: E731
    fake_B, fake_A = G_AB(a), G_BA(b)
    return {
        'Adversarial': bce(D_B(fake_B), real_label) + bce(D_A(fake_A), real_label),
        'Cycle': (G_BA(fake_B) - a).abs().mean() + (G_AB(fake_A) - b).abs().mean(),
        'Identity': (G_AB(b) - b).abs().mean() + (G_BA(a) - a).abs().mean(),
        'Matching': (fake_B - b).abs().mean() + (fake_A - a).abs().mean(),
        'Distribution': sorted_l1(fake_B, a, b) + sorted_l1(fake_A, b, a),
    }, fake_A, fake_B


def sorted_l1(fake, source, real):
    """Mean |difference| of the sorted foreground intensities, the larger set taken at the smaller's quantiles
    (here both sets have the same size when the whole slice is foreground)."""
    fake, real = torch.sort(fake[source > -1]).values, torch.sort(real[real > -1]).values
    n = min(len(fake), len(real))
    at = lambda values: values[np.round(np.linspace(0, len(values) - 1, n)).astype(int)]  # noqa: E731
    return (at(fake) - at(real)).abs().mean()


@pytest.mark.parametrize('real_label', [1.0, 0.9])
def test_generator_losses_are_the_documented_terms(tiny_nets, real_label):
    (G_AB, G_BA, D_A, D_B), a, b = tiny_nets
    weights = full_weights(parse_arguments(['-ex', 'x', '--dist_weight', '1']))
    terms, fake_A, fake_B = generator_losses(a, b, G_AB, G_BA, D_A, D_B, weights, real_label)
    with torch.no_grad():
        expected, hand_fake_A, hand_fake_B = hand_terms(a, b, G_AB, G_BA, D_A, D_B, real_label)
    assert set(terms) == set(TERMS) == set(expected)
    for name in TERMS:
        assert terms[name].shape == ()
        assert terms[name].item() == pytest.approx(expected[name].item(), rel=1e-5, abs=1e-6), name
        assert terms[name].item() > 0
    torch.testing.assert_close(fake_A, hand_fake_A, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fake_B, hand_fake_B, rtol=1e-4, atol=1e-5)
    total = weights.weighted_total(terms)
    hand_total = (1 * expected['Adversarial'] + 5 * expected['Cycle'] + 1 * expected['Identity']
                  + 5 * expected['Matching'] + 1 * expected['Distribution'])
    assert total.item() == pytest.approx(hand_total.item(), rel=1e-5)


@pytest.mark.parametrize('zero', ['adv', 'ccl', 'identity', 'oml'])
def test_a_zero_weight_gives_a_zero_term_and_keeps_the_others(tiny_nets, zero):
    (G_AB, G_BA, D_A, D_B), a, b = tiny_nets
    values = dict(adv=1.0, ccl=5.0, identity=1.0, oml=5.0)
    values[zero] = 0.0
    terms, _, _ = generator_losses(a, b, G_AB, G_BA, D_A, D_B, LossWeights(**values))
    with torch.no_grad():
        expected, _, _ = hand_terms(a, b, G_AB, G_BA, D_A, D_B)
    name_of = dict(adv='Adversarial', ccl='Cycle', identity='Identity', oml='Matching')
    for key, name in name_of.items():
        if key == zero:
            assert terms[name].item() == 0
        else:
            assert terms[name].item() == pytest.approx(expected[name].item(), rel=1e-5, abs=1e-6)


def test_discriminator_loss_is_bce_on_real_and_detached_fake(tiny_nets):
    (G_AB, _, _, D_B), a, b = tiny_nets
    fake_B = G_AB(a)
    loss = discriminator_loss(D_B, b, fake_B, real_label=0.9)
    with torch.no_grad():
        lr, lf = D_B(b), D_B(fake_B)
        expected = (F.binary_cross_entropy_with_logits(lr, torch.full_like(lr, 0.9))
                    + F.binary_cross_entropy_with_logits(lf, torch.zeros_like(lf)))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in G_AB.parameters())
    assert all(p.grad is not None for p in D_B.parameters())


# ---- one training step ----------------------------------------------------------------------------

def test_trainer_builds_networks_from_the_flags(pickle_dataset, tmp_path):
    trainer = make_trainer(pickle_dataset, tmp_path, '--ngf', '4', '--n_res_blocks', '1', '--ndf', '4')
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(trainer.nets['G_AB']) == count(trainer.nets['G_BA']) == count(Generator(ngf=4, n_res_blocks=1))
    assert count(trainer.nets['D_A']) == count(trainer.nets['D_B']) == count(Discriminator(ndf=4))
    assert len(trainer.train_set) == 15 and len(trainer.eval_set) == 5  # 3 and 1 subjects, 5 slices each


@pytest.mark.parametrize('flags, beta2', [((), 0.999), (('--beta2', '0.99'), 0.99)])
def test_beta2_is_the_second_moment_decay_of_both_optimizers(pickle_dataset, tmp_path, flags, beta2):
    trainer = make_trainer(pickle_dataset, tmp_path, *flags)
    for optimizer in (trainer.optimizer_G, trainer.optimizer_D):
        assert optimizer.param_groups[0]['betas'] == (0.5, beta2)  # 0.999 by default: the seed's Adam


def test_one_step_changes_every_parameter_of_all_four_networks(pickle_dataset, tmp_path):
    trainer = make_trainer(pickle_dataset, tmp_path)
    real_A, real_B = first_batch(trainer)
    before = snapshot(trainer)
    loss_G, terms, loss_D, fake_A, fake_B = trainer.step(real_A, real_B, full_weights(trainer.args))
    assert torch.isfinite(loss_G) and torch.isfinite(loss_D) and loss_D > 0
    unchanged = [f'{name}.{key}' for name, net in trainer.nets.items() for key, p in net.named_parameters()
                 if torch.equal(p.detach(), before[name][key])]
    assert unchanged == []
    assert fake_A.shape == real_A.shape and fake_B.shape == real_B.shape


def test_discriminator_step_leaves_generator_gradients_untouched(pickle_dataset, tmp_path):
    trainer = make_trainer(pickle_dataset, tmp_path)
    generators = [p for name in ('G_AB', 'G_BA') for p in trainer.nets[name].parameters()]
    discriminators = [p for name in ('D_A', 'D_B') for p in trainer.nets[name].parameters()]
    seen = {}

    def before_generator_step(optimizer, args, kwargs):
        seen['G'] = [None if p.grad is None else p.grad.clone() for p in generators]
        seen['D_at_G_step'] = [None if p.grad is None else p.grad.clone() for p in discriminators]

    def before_discriminator_step(optimizer, args, kwargs):
        seen['D'] = [None if p.grad is None else p.grad.clone() for p in discriminators]

    trainer.optimizer_G.register_step_pre_hook(before_generator_step)
    trainer.optimizer_D.register_step_pre_hook(before_discriminator_step)
    real_A, real_B = first_batch(trainer)
    trainer.step(real_A, real_B, full_weights(trainer.args))
    assert 'G' in seen and 'D' in seen
    assert all(g is not None for g in seen['G'])
    assert all(g is not None for g in seen['D'])
    for p, grad in zip(generators, seen['G']):
        assert p.grad is not None and torch.equal(p.grad, grad)
    # the generator loss does not leave gradients in the discriminators either
    assert all(g is None or not g.any() for g in seen['D_at_G_step'])


class ImageCounter:
    """Counts the images each network is called on (forward pre-hooks)."""

    def __init__(self, nets):
        self.images = dict.fromkeys(nets, 0)
        self.handles = [net.register_forward_pre_hook(self._hook(name)) for name, net in nets.items()]

    def _hook(self, name):
        def hook(module, inputs):
            self.images[name] += inputs[0].shape[0]
        return hook


@pytest.mark.parametrize('flags', [[], ['--ccl_weight', '0'], ['--identity_weight', '0'], ['--adv_weight', '0'],
                                   ['--adv_weight', '0', '--ccl_weight', '0', '--identity_weight', '0']],
                         ids=['default', 'no_cycle', 'no_identity', 'no_adversarial', 'matching_only'])
def test_zero_weight_terms_cost_nothing(pickle_dataset, tmp_path, flags):
    trainer = make_trainer(pickle_dataset, tmp_path, *flags)
    weights = full_weights(trainer.args)
    real_A, real_B = first_batch(trainer)
    n = real_A.shape[0]
    counter = ImageCounter(trainer.nets)
    before = snapshot(trainer)
    trainer.step(real_A, real_B, weights)
    # each generator: the translation, plus the identity pass and the cycle pass only where weighted
    per_generator = n * (1 + (weights.identity > 0) + (weights.ccl > 0))
    assert counter.images['G_AB'] == counter.images['G_BA'] == per_generator
    if weights.adv:
        # the generator loss scores the fakes (n), the discriminator step real and fake (2n)
        assert counter.images['D_A'] == counter.images['D_B'] == 3 * n
    else:
        assert counter.images['D_A'] == counter.images['D_B'] == 0
        for name in ('D_A', 'D_B'):
            for key, p in trainer.nets[name].named_parameters():
                assert torch.equal(p.detach(), before[name][key]), f'{name}.{key} changed without a D step'
        assert not trainer.optimizer_D.state
    for name in ('G_AB', 'G_BA'):
        assert any(not torch.equal(p.detach(), before[name][k]) for k, p in trainer.nets[name].named_parameters())


@pytest.mark.parametrize('gan_slices', [1, 2])
def test_gan_slices_terms_are_the_documented_terms_of_the_first_slices(tiny_nets, gan_slices):
    """Cycle and adversarial terms over the first N slices, paired and identity terms over the whole batch."""
    (G_AB, G_BA, D_A, D_B), a, b = tiny_nets
    weights = full_weights(parse_arguments(['-ex', 'x']))
    terms, _, _ = generator_losses(a, b, G_AB, G_BA, D_A, D_B, weights, 0.9, gan_slices)
    with torch.no_grad():
        whole, _, _ = hand_terms(a, b, G_AB, G_BA, D_A, D_B, 0.9)
        first, _, _ = hand_terms(a[:gan_slices], b[:gan_slices], G_AB, G_BA, D_A, D_B, 0.9)
    for name, expected in (('Cycle', first), ('Adversarial', first), ('Matching', whole), ('Identity', whole)):
        assert terms[name].item() == pytest.approx(expected[name].item(), rel=1e-5, abs=1e-6), name
    assert terms['Cycle'].item() != pytest.approx(whole['Cycle'].item(), rel=1e-3)


def test_gan_slices_runs_the_cycle_and_discriminators_on_part_of_the_batch(pickle_dataset, tmp_path):
    """--gan_slices 1: the translations (and identity passes) see the whole batch, the cycle passes and both
    discriminators one slice."""
    trainer = make_trainer(pickle_dataset, tmp_path, '--gan_slices', '1', '--batch_size', '3')
    weights = full_weights(trainer.args)
    real_A, real_B = first_batch(trainer)
    n = real_A.shape[0]
    assert n == 3
    counter = ImageCounter(trainer.nets)
    trainer.step(real_A, real_B, weights)
    assert counter.images['G_AB'] == counter.images['G_BA'] == 2 * n + 1  # translation + identity, cycle on 1
    assert counter.images['D_A'] == counter.images['D_B'] == 1 + 2  # the generator loss, then real + fake
    with pytest.raises(UserError, match='--gan_slices'):
        make_args(pickle_dataset, tmp_path, '--gan_slices', '-1')


def test_warm_up_step_runs_only_the_paired_term(pickle_dataset, tmp_path):
    trainer = make_trainer(pickle_dataset, tmp_path, '--warmup_epochs', '1')
    weights = scheduled_weights(trainer.args, 0.5)
    real_A, real_B = first_batch(trainer)
    counter = ImageCounter(trainer.nets)
    loss_G, terms, loss_D, _, _ = trainer.step(real_A, real_B, weights)
    assert counter.images == {'G_AB': real_A.shape[0], 'G_BA': real_A.shape[0], 'D_A': 0, 'D_B': 0}
    assert loss_G.item() == pytest.approx(5 * terms['Matching'].item(), rel=1e-6)
    assert loss_D.item() == 0


# ---- schedules ----------------------------------------------------------------------------------

@pytest.mark.parametrize('progress, decay, total, expected', [
    (0, 4, 10, 1.0), (2.5, 4, 10, 1.0), (4, 4, 10, 1.0), (5, 4, 10, 5 / 6), (7, 4, 10, 0.5), (9.4, 4, 10, 0.1),
    (10, 4, 10, 0.0), (11, 4, 10, 0.0), (0, 0, 2, 1.0), (1, 0, 2, 0.5), (1.5, 1, 2, 0.5), (49, 4, 50, 1 / 46),
])
def test_lr_factor(progress, decay, total, expected):
    assert lr_factor(progress, decay, total) == pytest.approx(expected, abs=1e-12)


def test_lr_factor_is_monotone_and_linear_after_decay():
    xs = np.linspace(0, 12, 241)
    ys = [lr_factor(x, 4, 10) for x in xs]
    assert all(a >= b for a, b in zip(ys, ys[1:]))
    assert all(0 <= y <= 1 for y in ys)
    tail = [(x, y) for x, y in zip(xs, ys) if 4 <= x <= 10]
    slopes = np.diff([y for _, y in tail]) / np.diff([x for x, _ in tail])
    np.testing.assert_allclose(slopes, -1 / 6, rtol=1e-9)


@pytest.mark.parametrize('warmup, rampup, progress, ramp', [
    (0, 0, 0.0, 1.0), (0, 0, 3.0, 1.0),
    (1, 0, 0.0, 0.0), (1, 0, 0.99, 0.0), (1, 0, 1.0, 1.0), (1, 0, 5.0, 1.0),
    (1, 2, 0.5, 0.0), (1, 2, 1.0, 0.0), (1, 2, 1.5, 0.25), (1, 2, 2.0, 0.5), (1, 2, 3.0, 1.0), (1, 2, 7.0, 1.0),
    (0, 4, 0.0, 0.0), (0, 4, 1.0, 0.25), (0.5, 0.5, 0.75, 0.5),
])
def test_scheduled_weights(warmup, rampup, progress, ramp):
    args = parse_arguments(['-ex', 'x', '--warmup_epochs', str(warmup), '--rampup_epochs', str(rampup),
                            '--adv_weight', '2', '--ccl_weight', '10', '--identity_weight', '0.5', '--oml_weight', '3'])
    weights = scheduled_weights(args, progress)
    assert weights.adv == pytest.approx(2 * ramp)
    assert weights.ccl == pytest.approx(10 * ramp)
    assert weights.identity == pytest.approx(0.5 * ramp)
    assert weights.oml == 3


@pytest.mark.parametrize('every', [1, 3])
def test_lazy_weights_scale_the_gan_terms_on_every_kth_step_and_drop_them_between(every):
    weights = LossWeights(adv=0.5, ccl=2.0, identity=1.0, oml=5.0)
    for step in range(7):
        lazy = lazy_weights(weights, step, every)
        scale = every if step % every == 0 else 0
        assert lazy == LossWeights(0.5 * scale, 2.0 * scale, 1.0 * scale, 5.0)
    # over K steps the terms get their full weight on average
    assert sum(lazy_weights(weights, step, every).ccl for step in range(every)) == every * 2.0


@pytest.mark.parametrize('gan_every', [1, 2])
def test_train_epoch_applies_lr_and_weight_schedules_per_iteration(pickle_dataset, tmp_path, gan_every):
    trainer = make_trainer(pickle_dataset, tmp_path, '--total_epoch', '3', '--decay_epoch', '1',
                           '--warmup_epochs', '0.5', '--rampup_epochs', '1', '--sample_save_freq', '1000',
                           '--gan_every', str(gan_every))
    os.makedirs(trainer.experiment_dir)
    record = []
    real_step = trainer.step

    def step(real_A, real_B, weights, matching=None):
        record.append((weights, trainer.optimizer_G.param_groups[0]['lr'], trainer.optimizer_D.param_groups[0]['lr'],
                       real_A.shape[0]))
        return real_step(real_A, real_B, weights)

    trainer.step = step
    iterations = len(trainer.train_loader)
    assert iterations == 8  # 15 slices in batches of 2
    for epoch in (1, 2):
        losses = trainer.train_epoch(epoch)
        assert set(losses) == {'Total', *TERMS, 'Discriminator'}
        assert all(math.isfinite(v) for v in losses.values())
    assert len(record) == 2 * iterations
    assert sum(r[3] for r in record[:iterations]) == 15  # every slice once per epoch
    for i, (weights, lr_G, lr_D, _) in enumerate(record):
        progress = i / iterations  # epochs done before this iteration
        assert weights == lazy_weights(scheduled_weights(trainer.args, progress), i % iterations, gan_every)
        assert lr_G == lr_D == pytest.approx(2e-4 * lr_factor(progress, 1, 3))
    assert record[0][0].adv == 0 and record[-2 if gan_every == 2 else -1][0].adv > 0
    if gan_every == 2:  # iteration 7 of 8 is not a K-th step: a paired step
        assert record[-1][0] == LossWeights(0, 0, 0, 5)
    assert record[-1][1] < 2e-4


def test_sample_grid_for_a_batch_of_one(pickle_dataset, tmp_path):
    trainer = make_trainer(pickle_dataset, tmp_path, '--ccl_weight', '0')  # the original crashed without cycles too
    real_A, real_B = first_batch(trainer)
    path = tmp_path / 'sample' / 'one.png'
    trainer.save_samples(real_A[:1], real_B[:1], str(path))
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    import matplotlib.image
    one = matplotlib.image.imread(str(path))
    path2 = tmp_path / 'sample' / 'two.png'
    trainer.save_samples(real_A[:2], real_B[:2], str(path2))
    two = matplotlib.image.imread(str(path2))
    assert one.shape[1] == two.shape[1]  # six columns in both
    assert one.shape[0] < two.shape[0]  # one row of images instead of two


def test_epoch_ending_in_a_batch_of_one_saves_its_sample(pickle_dataset, tmp_path):
    trainer = make_trainer(pickle_dataset, tmp_path, '--sample_save_freq', '7')
    os.makedirs(trainer.experiment_dir)
    assert len(trainer.train_set) % 2 == 1 and len(trainer.train_loader) == 8
    trainer.train_epoch(1)
    folder = os.path.join(trainer.experiment_dir, 'sample', 'epoch_1')
    assert sorted(os.listdir(folder)) == ['iter_0.png', 'iter_7.png']  # iteration 7 is the batch of one


# ---- train.py end to end ---------------------------------------------------------------------------

@pytest.fixture
def trained(tiny_experiment):
    """The session's tiny two-epoch experiment (conftest.tiny_experiment), written by train.py's main."""
    with open(os.path.join(tiny_experiment['dir'], 'arguments.txt')) as f:
        saved = json.load(f)
    return {'dir': tiny_experiment['dir'], 'data_root': str(tiny_experiment['dataset']), 'stdout':
            tiny_experiment['stdout'], 'lower_bound': saved['lower_bound'], 'upper_bound': saved['upper_bound']}


def test_arguments_txt_is_json_with_every_flag(trained):
    with open(os.path.join(trained['dir'], 'arguments.txt')) as f:
        saved = json.load(f)
    defaults = vars(parse_arguments(['-ex', 'x']))
    assert set(saved) == set(defaults)
    assert saved['experiment'] == 'tiny'
    assert saved['data_root'] == trained['data_root']
    assert saved['ngf'] == 8 and saved['n_res_blocks'] == 2 and saved['ndf'] == 8
    assert saved['total_epoch'] == 2 and saved['batch_size'] == 2 and saved['decay_epoch'] == 1
    assert saved['lower_bound'] == 0.45 and saved['upper_bound'] == 0.55
    assert saved['ccl_weight'] == 5 and saved['oml_weight'] == 5


LOSS_COLUMNS = (['epoch'] + [f'{part} {term}' for part in ('Train', 'Eval')
                             for term in ('Total', 'Adversarial', 'Cycle', 'Identity', 'Matching', 'Discriminator')]
                + ['Eval SSIM A2B', 'Eval PSNR A2B', 'Eval SSIM B2A', 'Eval PSNR B2A'])


def test_loss_csv(trained):
    table = pd.read_csv(os.path.join(trained['dir'], 'loss', 'loss.csv'))
    assert len(table) == 2
    assert list(table['epoch']) == [1, 2]
    missing = [c for c in LOSS_COLUMNS if c not in table.columns]
    assert missing == []
    values = table[LOSS_COLUMNS].to_numpy(dtype=float)
    assert np.isfinite(values).all()
    for column in ('Eval PSNR A2B', 'Eval PSNR B2A'):
        assert table[column].between(5, 60).all(), table[column]
    for column in ('Eval SSIM A2B', 'Eval SSIM B2A'):
        assert table[column].between(-1, 1).all()
    for term in ('Total', 'Adversarial', 'Cycle', 'Identity', 'Matching', 'Discriminator'):
        assert (table[f'Train {term}'] > 0).all() and (table[f'Eval {term}'] > 0).all()
    assert table['Train Matching'].iloc[1] < table['Train Matching'].iloc[0]  # it learns something


def test_loss_png(trained):
    path = os.path.join(trained['dir'], 'loss', 'loss.png')
    with open(path, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert os.path.getsize(path) > 5000


def test_samples_written(trained):
    for epoch in (1, 2):
        path = os.path.join(trained['dir'], 'sample', f'epoch_{epoch}', 'iter_0.png')
        with open(path, 'rb') as f:
            assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_checkpoints_load_weights_only_into_tiny_networks(trained):
    model = os.path.join(trained['dir'], 'model')
    states = {}
    for epoch in (1, 2):
        for name in (f'netG_S_to_P_epoch_{epoch}.pth', f'netG_P_to_S_epoch_{epoch}.pth'):
            saved = torch.load(os.path.join(model, name), map_location='cpu', weights_only=True)
            assert saved['generator_config'] == Generator(ngf=8, n_res_blocks=2).config
            state = saved['state_dict']
            Generator(ngf=8, n_res_blocks=2).load_state_dict(state)  # strict: every key, every shape
            states[name] = state
        for name in (f'netD_S_epoch_{epoch}.pth', f'netD_P_epoch_{epoch}.pth'):
            state = torch.load(os.path.join(model, name), map_location='cpu', weights_only=True)
            Discriminator(ndf=8).load_state_dict(state)
    # the networks trained between the two epochs
    first, second = states['netG_S_to_P_epoch_1.pth'], states['netG_S_to_P_epoch_2.pth']
    assert any(not torch.equal(first[k], second[k]) for k in first)
    # the two directions are different networks
    assert any(not torch.equal(second[k], states['netG_P_to_S_epoch_2.pth'][k]) for k in second)


@pytest.mark.parametrize('direction, checkpoint, source, target', [
    ('A2B', 'netG_S_to_P_epoch_2.pth', 0, 1), ('B2A', 'netG_P_to_S_epoch_2.pth', 1, 0)])
def test_epoch_2_checkpoint_reproduces_the_logged_eval_metrics(trained, direction, checkpoint, source, target):
    """The epoch-2 weights are the ones evaluated after epoch 2, and the logged SSIM/PSNR are skimage's over the
    whole eval set (mean per-slice SSIM, PSNR of the stacked slices, images in [0, 1])."""
    net = Generator(ngf=8, n_res_blocks=2)
    net.load_state_dict(torch.load(os.path.join(trained['dir'], 'model', checkpoint), weights_only=True)['state_dict'])
    net.eval()
    data = Paired_Dataset(trained['data_root'], split='evalset', lower_bound=trained['lower_bound'],
                          upper_bound=trained['upper_bound'], progress=False)
    predictions, targets = [], []
    with torch.no_grad():
        for i in range(len(data)):
            pair = data[i]
            predictions.append(((net(pair[source][None]) + 1) / 2).clamp(0, 1)[0, 0].double().numpy())
            targets.append(((pair[target] + 1) / 2)[0].double().numpy())
    ssim = np.mean([structural_similarity(p, t, data_range=1.0) for p, t in zip(predictions, targets)])
    psnr = peak_signal_noise_ratio(np.stack(targets), np.stack(predictions), data_range=1.0)
    row = pd.read_csv(os.path.join(trained['dir'], 'loss', 'loss.csv')).set_index('epoch').loc[2]
    assert row[f'Eval SSIM {direction}'] == pytest.approx(ssim, abs=2e-4)
    assert row[f'Eval PSNR {direction}'] == pytest.approx(psnr, abs=1e-2)


def test_training_output_names_what_it_wrote(trained):
    assert trained['dir'] in trained['stdout']
