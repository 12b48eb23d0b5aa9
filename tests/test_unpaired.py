"""Unpaired and semi-paired training: vendor pools from one-key pickles, independent draws, the matching term on
true pairs only, the reference-free eval figures, and train.py end to end (with resume) on data without pairs."""
import json
import os
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import RandomSampler

import train
from conftest import REPO, mni_t1, second_vendor, subject_volume
from dataset.dataset import Paired_Dataset, VendorDraws
from model.generator import Generator
from utils.arguments import parse_arguments, resolve_matching_weight
from utils.errors import UserError
from utils.losses import MatchingTargets, full_weights, generator_losses, scheduled_weights
from utils.metrics import DistributionMetrics, foreground_values, vendor_distance
from utils.trainer import CycleGANTrainer

VENDORS = ('SIEMENS', 'Philips')
TINY = ['--ngf', '8', '--n_res_blocks', '1', '--ndf', '8', '--num_workers', '0', '--device', 'cpu',
        '--batch_size', '2', '--lower_bound', '0.4', '--upper_bound', '0.55', '--sample_save_freq', '1000',
        '--log_freq', '1000']


def write_subject(root, split, name, volumes):
    """Slices of one subject: `volumes` maps vendor -> normalised (X, Y, Z) volume; one key per vendor given."""
    folder = os.path.join(root, split, name)
    os.makedirs(folder)
    depth = next(iter(volumes.values())).shape[2]
    for k in range(depth):
        with open(os.path.join(folder, f'slice_{k:03d}.pkl'), 'wb') as f:
            pickle.dump({v: np.clip(data[:, :, k], 0, 1)[..., None].astype(np.float32) for v, data in volumes.items()}, f)


def mri_subject(index):
    """Both vendors' normalised views of one subject of the 4 mm MNI template."""
    a = subject_volume(np.asarray(mni_t1(4).dataobj, dtype=np.float32), index)
    b = second_vendor(a, index)
    return {VENDORS[0]: a / np.percentile(a[a > 0], 99.5), VENDORS[1]: b / np.percentile(b[b > 0], 99.5)}


def mixed_dataset(root, train_kinds, eval_kinds=('A', 'B')):
    """Subjects of the given kinds per split: 'AB' a pair, 'A' vendor 1 only, 'B' vendor 2 only."""
    index = 0
    for split, kinds in (('trainset', train_kinds), ('evalset', eval_kinds)):
        for kind in kinds:
            both = mri_subject(index)
            volumes = {v: both[v] for v, letter in zip(VENDORS, 'AB') if letter in kind}
            write_subject(root, split, f'subj_{index:03d}', volumes)
            index += 1
    return str(root)


@pytest.fixture(scope='module')
def semi_paired(tmp_path_factory):
    return mixed_dataset(tmp_path_factory.mktemp('semi'), ('AB', 'A', 'B', 'B'))


@pytest.fixture(scope='module')
def unpaired(tmp_path_factory):
    return mixed_dataset(tmp_path_factory.mktemp('unpaired'), ('A', 'A', 'B'))


# ---- the dataset -----------------------------------------------------------------------------------

def test_one_key_pickles_form_each_vendors_pool_and_pairs_keep_their_partner(semi_paired):
    ds = Paired_Dataset(semi_paired, lower_bound=0, upper_bound=1, progress=False)
    depth = mni_t1(4).shape[2]
    assert not ds.all_paired and ds.n_pairs == depth
    assert len(ds.pool['SIEMENS']) == 2 * depth and len(ds.pool['Philips']) == 3 * depth
    assert len(ds) == 3 * depth  # an epoch is one pass over the larger pool
    truth = mri_subject(0)
    for k in (0, depth // 2, depth - 1):
        partner = int(ds.partner['SIEMENS'][k])
        a, b, target_B, has_B, target_A, has_A = ds[(k, partner)]
        assert bool(has_B) and bool(has_A)
        np.testing.assert_allclose(a[0].numpy(), np.clip(truth['SIEMENS'][:, :, k], 0, 1) * 2 - 1, atol=1e-6)
        np.testing.assert_allclose(target_B[0].numpy(), np.clip(truth['Philips'][:, :, k], 0, 1) * 2 - 1, atol=1e-6)
        torch.testing.assert_close(target_B, b)
        torch.testing.assert_close(target_A, a)
    single_A, single_B = depth + 3, 2 * depth + 1  # a vendor-1-only and a vendor-2-only slice
    assert ds.partner['SIEMENS'][single_A] == -1 and ds.partner['Philips'][single_B] == -1
    _, _, target_B, has_B, target_A, has_A = ds[(single_A, single_B)]
    assert not has_B and not has_A and not target_B.any() and not target_A.any()


def test_all_paired_data_keeps_the_seeds_items(semi_paired, pickle_dataset):
    ds = Paired_Dataset(pickle_dataset, lower_bound=0.3, upper_bound=0.6, progress=False)
    assert ds.all_paired and len(ds) == ds.n_pairs == len(ds.paths)
    a, b = ds[0]
    assert a.shape == b.shape == (1, *ds.image_size)


def test_a_one_key_pickle_with_an_unknown_vendor_names_the_file(tmp_path):
    mixed_dataset(tmp_path, ('AB', 'A'))
    bad = os.path.join(tmp_path, 'trainset', 'subj_001', 'slice_000.pkl')
    with open(bad, 'wb') as f:
        pickle.dump({'GE': np.zeros((49, 58, 1), np.float32)}, f)
    with pytest.raises(UserError) as info:
        Paired_Dataset(str(tmp_path), lower_bound=0, upper_bound=1, progress=False)
    assert bad in str(info.value) and "'GE'" in str(info.value) and '--vendor1' in str(info.value)


def test_a_split_without_one_vendor_says_which(tmp_path):
    root = mixed_dataset(tmp_path, ('AB', 'A'), eval_kinds=('A',))
    with pytest.raises(UserError) as info:
        Paired_Dataset(root, split='evalset', lower_bound=0, upper_bound=1, progress=False)
    assert os.path.join(root, 'evalset') in str(info.value) and 'no Philips slice' in str(info.value)


# ---- the draws -------------------------------------------------------------------------------------

def test_vendor_draws_cover_the_larger_pool_once_and_repeat_the_smaller():
    draws = VendorDraws([7, 3], seed=5)
    items = list(draws)
    assert len(items) == len(draws) == 7
    assert sorted(k1 for k1, _ in items) == list(range(7))
    counts = np.bincount([k2 for _, k2 in items], minlength=3)
    assert counts.sum() == 7 and counts.min() >= 2  # every slice of the smaller pool, then again
    assert list(VendorDraws([7, 3], seed=5)) == items  # the same seed and epoch draw the same
    draws.set_epoch(1)
    assert list(draws) != items


def test_vendor_draws_shard_an_epoch_between_processes():
    whole = VendorDraws([10, 4], seed=1).items()
    shards = [VendorDraws([10, 4], seed=1, rank=r, world_size=3).items() for r in range(3)]
    assert all(len(shard) == 3 for shard in shards)
    assert sorted(sum(shards, [])) == sorted(whole[:9])


def test_pair_share_draws_that_share_of_items_as_pairs_every_pair_in_turn():
    pairs = [(0, 5), (3, 1)]
    plain = VendorDraws([10, 6], seed=2).items()
    assert VendorDraws([10, 6], seed=2, pairs=pairs).items() == plain  # no share given: the draws are unchanged
    items = VendorDraws([10, 6], seed=2, pairs=pairs, pair_share=0.6).items()
    assert len(items) == 10
    replaced = [i for i, (drawn, before) in enumerate(zip(items, plain)) if drawn != before]
    assert all(items[i] in pairs for i in replaced)
    assert sum(item in pairs for item in items) >= 6
    assert sorted(items.count(pair) for pair in pairs)[0] >= 3  # both pairs, in turn
    assert VendorDraws([10, 6], seed=2, pairs=pairs, pair_share=1).items().count((0, 5)) == 5


def test_pair_share_without_pairs_or_outside_0_to_1_is_refused():
    with pytest.raises(UserError, match='--pair_share 1.5 is a share'):
        parse_arguments(['-ex', 'x', '--pair_share', '1.5'])
    args = parse_arguments(['-ex', 'x', '--pair_share', '0.5'])
    with pytest.raises(UserError) as info:
        resolve_matching_weight(args, n_pairs=0, train_dir='data/trainset')
    assert 'data/trainset has no paired slices' in str(info.value) and 'drop --pair_share' in str(info.value)


def test_pair_share_feeds_the_matching_term_that_share_of_a_semi_paired_epoch(semi_paired, tmp_path):
    counts = {}
    for share in (None, 0.75):
        extra = [] if share is None else ['--pair_share', str(share)]
        args = parse_arguments(['-ex', 't', '--data_root', semi_paired, '--save_dir', str(tmp_path), *TINY, *extra])
        trainer = CycleGANTrainer(args, torch.device('cpu'), str(tmp_path / 't'))
        counts[share] = 0
        for real_A, real_B, target_B, has_B, target_A, has_A in trainer.train_loader:
            for i in range(real_A.shape[0]):  # a drawn pair: each slice is the other's target
                if has_B[i] and torch.equal(real_B[i], target_B[i]):
                    assert has_A[i] and torch.equal(real_A[i], target_A[i])
                    counts[share] += 1
    assert counts[0.75] >= round(0.75 * len(trainer.train_set)) > counts[None]


# ---- the matching term ------------------------------------------------------------------------------

def test_a_single_vendor_slice_never_enters_the_matching_term():
    torch.manual_seed(0)
    G_AB, G_BA = Generator(ngf=8, n_res_blocks=1), Generator(ngf=8, n_res_blocks=1)
    real_A, real_B = torch.rand(4, 1, 32, 32) * 2 - 1, torch.rand(4, 1, 32, 32) * 2 - 1
    partner_B, partner_A = torch.rand(4, 1, 32, 32) * 2 - 1, torch.rand(4, 1, 32, 32) * 2 - 1
    has_B, has_A = torch.tensor([True, False, False, True]), torch.tensor([False, True, False, False])
    # Any unpaired item that entered the term would make it NaN.
    poisoned_B, poisoned_A = partner_B.clone(), partner_A.clone()
    poisoned_B[~has_B], poisoned_A[~has_A] = float('nan'), float('nan')
    weights = full_weights(parse_arguments(['-ex', 'x', '--adv_weight', '0', '--ccl_weight', '0',
                                            '--identity_weight', '0']))
    terms, fake_A, fake_B = generator_losses(real_A, real_B, G_AB, G_BA, None, None, weights,
                                             matching=MatchingTargets(poisoned_B, has_B, poisoned_A, has_A))
    expected = ((fake_B[has_B] - partner_B[has_B]).abs().mean() + (fake_A[has_A] - partner_A[has_A]).abs().mean())
    assert torch.isfinite(terms['Matching'])
    assert terms['Matching'].item() == pytest.approx(expected.item(), rel=1e-5)
    none = torch.zeros(4, dtype=torch.bool)
    terms, _, _ = generator_losses(real_A, real_B, G_AB, G_BA, None, None, weights,
                                   matching=MatchingTargets(poisoned_B, none, poisoned_A, none))
    assert terms['Matching'].item() == 0


def test_a_warm_up_step_on_a_batch_without_pairs_leaves_the_generators_as_they_are(semi_paired, tmp_path):
    """Semi-paired data with --warmup_epochs (the matching term alone): a batch of single-vendor slices has no
    term to learn from; the step runs (it crashed in backward) and moves no weight."""
    args = parse_arguments(['-ex', 't', '--data_root', semi_paired, '--save_dir', str(tmp_path), *TINY,
                            '--warmup_epochs', '1'])
    trainer = CycleGANTrainer(args, torch.device('cpu'), str(tmp_path / 't'))
    weights = scheduled_weights(args, 0.5)
    assert not (weights.adv or weights.ccl or weights.dist) and weights.oml
    set_A, set_B = trainer.train_set, trainer.train_set
    single_A = [k for k, partner in enumerate(set_A.partner['SIEMENS']) if partner < 0][:2]
    single_B = [k for k, partner in enumerate(set_B.partner['Philips']) if partner < 0][:2]
    real_A = torch.stack([set_A._image('SIEMENS', k) for k in single_A])
    real_B = torch.stack([set_B._image('Philips', k) for k in single_B])
    none = torch.zeros(2, dtype=torch.bool)
    before = {name: value.clone() for name, value in trainer.nets['G_AB'].state_dict().items()}
    loss_G, terms, _, _, _ = trainer.step(real_A, real_B, weights,
                                          MatchingTargets(torch.zeros_like(real_B), none, torch.zeros_like(real_A), none))
    assert loss_G.item() == 0
    for name, value in trainer.nets['G_AB'].state_dict().items():
        torch.testing.assert_close(value, before[name])


def test_training_batches_carry_exactly_the_true_pairs(semi_paired, tmp_path):
    args = parse_arguments(['-ex', 't', '--data_root', semi_paired, '--save_dir', str(tmp_path), *TINY])
    trainer = CycleGANTrainer(args, torch.device('cpu'), str(tmp_path / 't'))
    ds = trainer.train_set
    drawn_pairs, seen_A = 0, 0
    for real_A, real_B, target_B, has_B, target_A, has_A in trainer.train_loader:
        for i in range(real_A.shape[0]):
            a_is_paired = any(torch.equal(real_A[i], ds._image('SIEMENS', k)) and ds.partner['SIEMENS'][k] >= 0
                              for k in range(len(ds.pool['SIEMENS'])))
            assert bool(has_B[i]) == a_is_paired
        drawn_pairs += int(has_B.sum())
        seen_A += real_A.shape[0]
    assert seen_A == len(ds) and drawn_pairs >= ds.n_pairs  # every pair's vendor-1 slice drawn at least once
    assert args.oml_weight == 5  # pairs present: the seed's weight


def test_paired_data_keeps_the_seeds_loader_and_steps(pickle_dataset, tmp_path):
    args = parse_arguments(['-ex', 't', '--data_root', pickle_dataset, '--save_dir', str(tmp_path), *TINY])
    trainer = CycleGANTrainer(args, torch.device('cpu'), str(tmp_path / 't'))
    assert isinstance(trainer.train_sampler, RandomSampler)
    generator = torch.Generator().manual_seed(args.random_seed)
    order = torch.randperm(len(trainer.train_set), generator=generator).tolist()
    real_A, real_B = next(iter(trainer.train_loader))
    torch.testing.assert_close(real_A, torch.stack([trainer.train_set[i][0] for i in order[:2]]))
    torch.testing.assert_close(real_B, torch.stack([trainer.train_set[i][1] for i in order[:2]]))
    assert args.oml_weight == 5


# ---- the matching weight ----------------------------------------------------------------------------

def test_matching_weight_is_off_without_pairs_and_an_explicit_one_is_refused(unpaired, tmp_path):
    args = parse_arguments(['-ex', 't', '--data_root', unpaired, '--save_dir', str(tmp_path), *TINY])
    CycleGANTrainer(args, torch.device('cpu'), str(tmp_path / 't'))
    assert args.oml_weight == 0
    semi_recipe = '@' + os.path.join(REPO, 'recipes', 'cpu_semi_paired.args')
    for flags in (['--oml_weight', '5'], ['--warmup_epochs', '2'], ['--gan_every', '2'], ['--pair_share', '0.5'],
                  [semi_recipe]):
        args = parse_arguments(['-ex', 't', '--data_root', unpaired, '--save_dir', str(tmp_path), *TINY, *flags])
        with pytest.raises(UserError) as info:
            CycleGANTrainer(args, torch.device('cpu'), str(tmp_path / 't'))
        flag = '--oml_weight' if flags == [semi_recipe] else flags[0]  # the recipe's first flag that needs pairs
        assert flag in str(info.value) and os.path.join(unpaired, 'trainset') in str(info.value)


# ---- the intensity curve ------------------------------------------------------------------------------

def test_intensity_curves_are_fitted_on_each_vendors_training_slices(unpaired, tmp_path):
    from model.generator import curve_knots
    args = parse_arguments(['-ex', 't', '--data_root', unpaired, '--save_dir', str(tmp_path), *TINY,
                            '--residual', '--intensity_curve'])
    trainer = CycleGANTrainer(args, torch.device('cpu'), str(tmp_path / 't'))
    G_AB, G_BA, train_set = trainer.nets['G_AB'], trainer.nets['G_BA'], trainer.train_set
    slices = {v: torch.stack([train_set._image(v, k) for k in range(len(train_set.pool[v]))]) for v in VENDORS}
    knots = {v: curve_knots(images[images > -1]) for v, images in slices.items()}
    torch.testing.assert_close(G_AB.curve_in, knots['SIEMENS'])
    torch.testing.assert_close(G_AB.curve_out, knots['Philips'])
    torch.testing.assert_close(G_BA.curve_in, knots['Philips'])
    torch.testing.assert_close(G_BA.curve_out, knots['SIEMENS'])
    with torch.no_grad():  # before any step: SIEMENS slices come out with Philips' foreground histogram
        fake = G_AB(slices['SIEMENS'])
    foreground = slices['SIEMENS'] > -1
    quantiles = torch.tensor([0.25, 0.5, 0.75])
    philips = slices['Philips'][slices['Philips'] > -1]
    np.testing.assert_allclose(torch.quantile(fake[foreground], quantiles), torch.quantile(philips, quantiles),
                               atol=0.02)
    assert not np.allclose(torch.quantile(slices['SIEMENS'][foreground], quantiles),
                           torch.quantile(philips, quantiles), atol=0.05)


# ---- reference-free figures ---------------------------------------------------------------------------

def test_distribution_metrics_agree_with_scipy_and_skimage():
    from skimage.metrics import normalized_mutual_information
    volume = mri_subject(0)
    a, b = np.clip(volume['SIEMENS'], 0, 1), np.clip(volume['Philips'], 0, 1)
    a[a < 0.01], b[b < 0.01] = 0, 0  # no voxel so dark that float32 rounding in the network range zeroes it
    slices_a = torch.from_numpy(np.moveaxis(a, 2, 0)[:, None] * 2 - 1)
    slices_b = torch.from_numpy(np.moveaxis(b, 2, 0)[:, None] * 2 - 1)
    remapped = np.where(a > 0, a ** 2, 0)  # a monotone remapping: the same anatomy
    metric = DistributionMetrics()
    metric.update(slices_a, torch.from_numpy(np.moveaxis(remapped, 2, 0)[:, None] * 2 - 1))
    metric.update_target(slices_b)
    exact = vendor_distance(foreground_values(remapped[a > 0]), foreground_values(b))
    assert metric.vendor_distance == pytest.approx(exact, abs=2e-3)
    # skimage bins each image's own range, these figures bin [0, 1]: close, not equal
    assert metric.anatomy == pytest.approx(normalized_mutual_information(a[a > 0], remapped[a > 0], bins=64), abs=0.08)
    shuffled = DistributionMetrics()  # the same intensities at the wrong places: the anatomy is gone
    rng = np.random.default_rng(0)
    scrambled = remapped.copy()
    scrambled[a > 0] = rng.permutation(remapped[a > 0])
    shuffled.update(slices_a, torch.from_numpy(np.moveaxis(scrambled, 2, 0)[:, None] * 2 - 1))
    shuffled.update_target(slices_b)
    assert shuffled.vendor_distance == pytest.approx(metric.vendor_distance, abs=1e-9)
    assert shuffled.anatomy < 1.1 < 1.5 < metric.anatomy


# ---- train.py end to end ------------------------------------------------------------------------------

@pytest.mark.slow
def test_unpaired_training_writes_reference_free_figures_and_resumes(unpaired, tmp_path):
    common = ['-ex', 'u', '--data_root', unpaired, '--save_dir', str(tmp_path), *TINY, '--decay_epoch', '1',
              '--residual', '--intensity_curve']
    train.main([*common, '--total_epoch', '2', '--stop_after_epoch', '1'])
    experiment = tmp_path / 'u'
    train.main([*common, '--total_epoch', '2', '--resume'])
    table = pd.read_csv(experiment / 'loss' / 'loss.csv')
    assert list(table['epoch']) == [1, 2]
    assert table['Eval SSIM A2B'].isna().all() and table['Eval PSNR B2A'].isna().all()  # no made-up numbers
    assert (table['Eval VendorDistance A2B'] > 0).all() and table['Eval Anatomy B2A'].between(1, 2).all()
    assert (table['Train Matching'] == 0).all()
    with open(experiment / 'model' / 'best.json') as f:
        best = json.load(f)
    assert best['A2B']['epoch'] in (1, 2) and 'vendor_distance' in best['A2B']
    best_generator = torch.load(experiment / 'model' / 'netG_S_to_P_best.pth', weights_only=True)
    assert best_generator['generator_config']['intensity_curve'] is True
    assert best_generator['state_dict']['curve_out'].min() == -1 and best_generator['state_dict']['curve_out'].max() == 1
    with open(experiment / 'arguments.txt') as f:
        assert json.load(f)['oml_weight'] == 0
