"""Data preparation: dataset/generate_paired_dataset.py on vendor folders built here (not by make_demo_data):
pairs, single-vendor subjects, --unpaired, --test_subjects, --voxel_size (and inference's resampling to that
spacing and back), the shared intensity normalisation, its errors, and dataset/make_demo_data.py.

Expected values are computed with nibabel and numpy directly (as_closest_canonical, np.percentile), never
with the project's own volume helpers.
"""
import filecmp
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import aff2axcodes, apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from nibabel.processing import resample_from_to, resample_to_output

from conftest import REPO, mni_t1, run_script, second_vendor, subject_volume, tiny_train_flags

VENDORS = ('SIEMENS', 'Philips')
PERCENTILE = 99.5
SCRIPT = os.path.join('dataset', 'generate_paired_dataset.py')


# ---- helpers ------------------------------------------------------------------------------------

def run_generate(*args):
    """The script run as `python SCRIPT args...` would run it, in this process (a fresh Python costs seconds)."""
    code, out, err = run_script(SCRIPT, args, cwd=REPO)
    return subprocess.CompletedProcess([SCRIPT, *args], code, out, err)


def generate(vendor1_dir, vendor2_dir, output_dir, *flags):
    result = run_generate('--vendor1_dir', vendor1_dir, '--vendor2_dir', vendor2_dir, '--output_dir', output_dir,
                          *flags)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'Traceback' not in result.stderr
    return result


def reoriented(image, codes):
    """The same image stored with axis codes `codes` (the affine follows, so the anatomy is unchanged)."""
    return image.as_reoriented(ornt_transform(axcodes2ornt('RAS'), axcodes2ornt(tuple(codes))))


def save_vendor2(data, affine, path, codes):
    """Vendor 2 on disk: int16 with a scl_slope (nibabel picks it on save), stored with axis codes `codes`."""
    image = reoriented(nib.Nifti1Image(data.astype(np.float32), affine), codes)
    image.set_data_dtype(np.int16)
    nib.save(image, path)


VENDOR2_ORIENTATIONS = ('LPS', 'SLP', 'LPS', 'SLP', 'PIR', 'SLP')


def write_vendor_folders(root, subjects=5, resolution=4, names=None):
    """<root>/SIEMENS/subj_NNN.nii.gz float32 RAS and <root>/Philips/subj_NNN.nii.gz int16 with scl_slope,
    stored LPS or with the axial axis first (SLP). Returns (vendor1 dir, vendor2 dir)."""
    base = mni_t1(resolution)
    data = np.asarray(base.dataobj, dtype=np.float32)
    dirs = [os.path.join(str(root), v) for v in VENDORS]
    for folder in dirs:
        os.makedirs(folder, exist_ok=True)
    names = names or [f'subj_{i + 1:03d}' for i in range(subjects)]
    for i, name in enumerate(names):
        a = 1000 * subject_volume(data, i)
        b = second_vendor(a, i)
        nib.save(nib.Nifti1Image(a, base.affine), os.path.join(dirs[0], f'{name}.nii.gz'))
        save_vendor2(b, base.affine, os.path.join(dirs[1], f'{name}.nii.gz'),
                     VENDOR2_ORIENTATIONS[i % len(VENDOR2_ORIENTATIONS)])
    return dirs


def canonical_data(path):
    return nib.as_closest_canonical(nib.load(path)).get_fdata()


def percentile_of_foreground(data):
    return float(np.percentile(data[data > 0], PERCENTILE))


def normalised_canonical(path):
    data = canonical_data(path)
    return np.clip(data / percentile_of_foreground(data), 0, 1)


def load_slice(path):
    with open(path, 'rb') as f:
        return pickle.load(f)


def slice_files(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith('.pkl'))


def snapshot(*folders):
    """{path: sha256} of every file under the folders (to show they were not touched)."""
    digests = {}
    for folder in folders:
        for dirpath, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(dirpath, name)
                with open(path, 'rb') as f:
                    digests[path] = hashlib.sha256(f.read()).hexdigest()
    return digests


def correlation(a, b):
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# ---- one generated dataset shared by several tests ----------------------------------------------

@pytest.fixture(scope='module')
def vendor_dirs(tmp_path_factory):
    return write_vendor_folders(tmp_path_factory.mktemp('scans'), subjects=5)


@pytest.fixture(scope='module')
def generated(vendor_dirs, tmp_path_factory):
    output = str(tmp_path_factory.mktemp('generated') / 'dataset')
    result = generate(*vendor_dirs, output, '--test_ratio', '0.2', '--split_ratio', '0.7', '--seed', '0')
    with open(os.path.join(output, 'dataset_info.json')) as f:
        info = json.load(f)
    return output, info, result


def test_pickles_have_the_seed_format(generated):
    output, info, _ = generated
    subject = info['subjects']['trainset'][0]
    folder = os.path.join(output, 'trainset', subject)
    names = slice_files(folder)
    assert len(names) == 48  # the 4 mm template has 48 axial slices
    for name in names[::7]:
        sample = load_slice(os.path.join(folder, name))
        assert isinstance(sample, dict) and set(sample) == set(VENDORS)
        for vendor in VENDORS:
            image = sample[vendor]
            assert isinstance(image, np.ndarray) and image.dtype == np.float32
            assert image.shape == (50, 59, 1)
            assert image.min() >= 0 and image.max() <= 1


def test_slices_equal_canonical_slices_normalised_independently(generated, vendor_dirs):
    output, info, _ = generated
    checked_axial_first = False
    for split in ('trainset', 'evalset'):
        for subject in info['subjects'][split]:
            folder = os.path.join(output, split, subject)
            expected = [normalised_canonical(os.path.join(d, f'{subject}.nii.gz')) for d in vendor_dirs]
            assert len(slice_files(folder)) == expected[0].shape[2]
            for k in range(0, expected[0].shape[2], 5):
                sample = load_slice(os.path.join(folder, f'slice_{k:03d}.pkl'))
                for vendor, volume in zip(VENDORS, expected):
                    np.testing.assert_allclose(sample[vendor][:, :, 0], volume[:, :, k], atol=2e-5,
                                               err_msg=f'{subject} {vendor} slice {k}')
            stored = aff2axcodes(nib.load(os.path.join(vendor_dirs[1], f'{subject}.nii.gz')).affine)
            checked_axial_first |= stored[0] in 'SI'
    assert checked_axial_first, 'no subject stored with the axial axis first was checked'


def test_pairs_stored_in_two_orientations_are_aligned(generated, vendor_dirs):
    output, info, _ = generated
    for subject in info['subjects']['trainset'] + info['subjects']['evalset']:
        split = 'trainset' if subject in info['subjects']['trainset'] else 'evalset'
        canon = [canonical_data(os.path.join(d, f'{subject}.nii.gz')) for d in vendor_dirs]
        for k in (18, 24, 30):
            sample = load_slice(os.path.join(output, split, subject, f'slice_{k:03d}.pkl'))
            got = correlation(sample[VENDORS[0]], sample[VENDORS[1]])
            want = correlation(canon[0][:, :, k], canon[1][:, :, k])
            assert got > 0.8 and abs(got - want) < 0.02, (subject, k, got, want)


def test_split_is_by_subject_and_testset_holds_the_originals(generated, vendor_dirs):
    output, info, _ = generated
    splits = info['subjects']
    everyone = {f'subj_{i + 1:03d}' for i in range(5)}
    sets = [set(splits[s]) for s in ('trainset', 'evalset', 'testset')]
    assert sum(map(len, sets)) == 5 and set.union(*sets) == everyone
    assert all(len(s) >= 1 for s in sets)
    for split in ('trainset', 'evalset'):
        assert set(os.listdir(os.path.join(output, split))) == set(splits[split])
    for vendor, folder in zip(VENDORS, vendor_dirs):
        test_dir = os.path.join(output, 'testset', vendor)
        assert sorted(os.listdir(test_dir)) == sorted(f'{s}.nii.gz' for s in splits['testset'])
        for name in os.listdir(test_dir):
            assert filecmp.cmp(os.path.join(test_dir, name), os.path.join(folder, name), shallow=False)


def test_dataset_info_contents(generated, vendor_dirs):
    _, info, _ = generated
    assert list(info['vendors']) == list(VENDORS)
    assert list(info['slice_size']) == [50, 59]
    assert '99.5' in json.dumps(info['normalisation'])  # the percentile used is recorded
    assert set(info['subjects']) >= {'trainset', 'evalset', 'testset'}
    for vendor, folder in zip(VENDORS, vendor_dirs):
        maxima = [percentile_of_foreground(canonical_data(os.path.join(folder, f'{s}.nii.gz')))
                  for s in info['subjects']['trainset']]
        assert info['intensity_scale'][vendor] == pytest.approx(float(np.median(maxima)), rel=1e-4)
    # two vendors at very different scales: the statistics must not be swapped or shared
    assert info['intensity_scale'][VENDORS[1]] > 2 * info['intensity_scale'][VENDORS[0]]


def test_same_seed_same_split_other_seed_other_split(generated, vendor_dirs, tmp_path):
    _, info, _ = generated
    flags = ('--test_ratio', '0.2', '--split_ratio', '0.7')
    generate(*vendor_dirs, tmp_path / 'again', *flags, '--seed', '0')
    with open(tmp_path / 'again' / 'dataset_info.json') as f:
        assert json.load(f)['subjects'] == info['subjects']
    for seed in (1, 2, 3, 4):
        generate(*vendor_dirs, tmp_path / f'seed{seed}', *flags, '--seed', seed)
        with open(tmp_path / f'seed{seed}' / 'dataset_info.json') as f:
            other = json.load(f)['subjects']
        assert sorted(sum(other.values(), [])) == sorted(sum(info['subjects'].values(), []))
        if other != info['subjects']:
            break
    else:
        pytest.fail('seeds 0 to 4 all gave the same split')


def test_train_py_trains_on_the_output_unchanged(generated, tmp_path):
    output, _, _ = generated
    flags = tiny_train_flags(total_epoch=1, decay_epoch=0, lower_bound=0.45, upper_bound=0.55)
    result = subprocess.run([sys.executable, 'train.py', '-ex', 'gen', '--data_root', output,
                             '--save_dir', str(tmp_path), *flags], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    model = tmp_path / 'gen' / 'model'
    assert (model / 'netG_S_to_P_epoch_1.pth').exists() and (model / 'netG_P_to_S_epoch_1.pth').exists()
    with open(tmp_path / 'gen' / 'dataset_info.json') as f:
        assert json.load(f)['intensity_scale'].keys() == set(VENDORS)


# ---- pairs, single-vendor subjects, --unpaired, --test_subjects ---------------------------------

def generate_in_process(vendor1_dir, vendor2_dir, output_dir, *flags):
    """generate_paired_dataset.main in this process (no interpreter start); returns dataset_info.json."""
    from dataset.generate_paired_dataset import main
    main(['--vendor1_dir', str(vendor1_dir), '--vendor2_dir', str(vendor2_dir), '--output_dir', str(output_dir),
          *map(str, flags)])
    with open(os.path.join(str(output_dir), 'dataset_info.json')) as f:
        return json.load(f)


def write_scans(root, names, resolutions=(4, 4), gains=None):
    """<root>/<vendor>/<name>.nii.gz for names = (vendor 1's names, vendor 2's names). Subject number i of all
    the names is subject_volume(template, i), vendor 2 its second_vendor view stored as save_vendor2 does, in
    the orientations of write_vendor_folders; both times gains[name]. Returns (vendor 1 dir, vendor 2 dir)."""
    everyone = sorted(set(names[0]) | set(names[1]))
    dirs = []
    for vendor, vendor_names, resolution in zip(VENDORS, names, resolutions):
        template = mni_t1(resolution)
        data = np.asarray(template.dataobj, dtype=np.float32)
        folder = os.path.join(str(root), vendor)
        os.makedirs(folder)
        for name in vendor_names:
            i = everyone.index(name)
            a = 1000 * subject_volume(data, i)
            gain = (gains or {}).get(name, 1.0)
            path = os.path.join(folder, f'{name}.nii.gz')
            if vendor == VENDORS[0]:
                nib.save(nib.Nifti1Image(gain * a, template.affine), path)
            else:
                save_vendor2(gain * second_vendor(a, i), template.affine, path, VENDOR2_ORIENTATIONS[i % 6])
        dirs.append(folder)
    return dirs


def folder_keys(output, split, folder):
    """The set of vendor keys of every pickle of one subject folder (one set if they all agree)."""
    return {tuple(load_slice(os.path.join(output, split, folder, name))) for name in slice_files(
        os.path.join(output, split, folder))}


PAIRS = ['subj_001', 'subj_002', 'subj_003', 'subj_004']
ONLY_1 = ['s_only_1', 's_only_2', 's_only_3', 's_only_4']
ONLY_2 = ['p_only_1', 'p_only_2', 'p_only_3', 'p_only_4']


@pytest.fixture(scope='module')
def semi_paired(tmp_path_factory):
    """4 subjects in both folders, 4 only in SIEMENS/, 4 only in Philips/ (those three times brighter, so the
    intensity statistics show whether they were used); subj_004 of SIEMENS stored as .nii."""
    root = tmp_path_factory.mktemp('semi')
    dirs = write_scans(root / 'scans', (PAIRS + ONLY_1, PAIRS + ONLY_2), gains={n: 3.0 for n in ONLY_1 + ONLY_2})
    nib.save(nib.load(os.path.join(dirs[0], 'subj_004.nii.gz')), os.path.join(dirs[0], 'subj_004.nii'))
    os.remove(os.path.join(dirs[0], 'subj_004.nii.gz'))
    output = str(root / 'out')
    info = generate_in_process(*dirs, output, '--split_ratio', '0.7')
    return dirs, output, info


def scan_path(dirs, vendor, subject):
    folder = dirs[VENDORS.index(vendor)]
    return next(os.path.join(folder, subject + suffix) for suffix in ('.nii.gz', '.nii')
                if os.path.exists(os.path.join(folder, subject + suffix)))


def test_partial_overlap_pairs_have_two_keys_the_others_one(semi_paired):
    dirs, output, info = semi_paired
    splits = info['subjects']
    assert sorted(splits['trainset'] + splits['evalset']) == sorted(PAIRS + ONLY_1 + ONLY_2)
    assert splits['testset'] == []
    for split in ('trainset', 'evalset'):
        assert sorted(os.listdir(os.path.join(output, split))) == sorted(splits[split])
        for folder in splits[split]:
            want = VENDORS if folder in PAIRS else (VENDORS[0],) if folder in ONLY_1 else (VENDORS[1],)
            assert folder_keys(output, split, folder) == {want}, (split, folder)
        # each kind is split on its own, so every split holds subjects of every kind
        for kind in (PAIRS, ONLY_1, ONLY_2):
            assert set(splits[split]) & set(kind), (split, kind)
    assert info['paired_subjects'] == sorted(PAIRS)
    assert info['unpaired'] is False and info['voxel_size'] is None
    for vendor, alone in zip(VENDORS, (ONLY_1, ONLY_2)):
        for split in ('trainset', 'evalset'):
            expected = [s for s in splits[split] if s in PAIRS or s in alone]
            assert sorted(info['vendor_subjects'][vendor][split]) == sorted(expected)
            assert info['vendor_slices'][split][vendor] == 48 * len(expected)
    for split in ('trainset', 'evalset'):
        assert info['vendor_slices'][split]['pairs'] == 48 * len(set(splits[split]) & set(PAIRS))
        assert info['slices'][split] == 48 * len(splits[split])


def test_single_vendor_slices_equal_the_normalised_volume(semi_paired):
    dirs, output, info = semi_paired
    split_of = {s: split for split in ('trainset', 'evalset') for s in info['subjects'][split]}
    for vendor, alone in zip(VENDORS, (ONLY_1, ONLY_2)):
        for subject in alone[:2]:
            expected = normalised_canonical(scan_path(dirs, vendor, subject))
            folder = os.path.join(output, split_of[subject], subject)
            assert len(slice_files(folder)) == expected.shape[2]
            for k in range(0, expected.shape[2], 3):
                sample = load_slice(os.path.join(folder, f'slice_{k:03d}.pkl'))
                assert list(sample) == [vendor] and sample[vendor].dtype == np.float32
                assert sample[vendor].shape == expected.shape[:2] + (1,)
                np.testing.assert_allclose(sample[vendor][:, :, 0], expected[:, :, k], atol=2e-5)


def test_pair_slices_of_a_semi_paired_dataset_are_aligned(semi_paired):
    dirs, output, info = semi_paired
    subject = next(s for s in info['subjects']['trainset'] if s in PAIRS)
    expected = [normalised_canonical(scan_path(dirs, v, subject)) for v in VENDORS]
    for k in (12, 24, 36):
        sample = load_slice(os.path.join(output, 'trainset', subject, f'slice_{k:03d}.pkl'))
        assert list(sample) == list(VENDORS)
        for vendor, volume in zip(VENDORS, expected):
            np.testing.assert_allclose(sample[vendor][:, :, 0], volume[:, :, k], atol=2e-5)


def test_intensity_scale_of_each_vendor_from_all_its_training_subjects(semi_paired):
    dirs, _, info = semi_paired
    for vendor in VENDORS:
        train = info['vendor_subjects'][vendor]['trainset']
        assert {s for s in train if s not in PAIRS}, 'no single-vendor subject trains'
        maxima = [percentile_of_foreground(canonical_data(scan_path(dirs, vendor, s))) for s in train]
        assert info['intensity_scale'][vendor] == pytest.approx(float(np.median(maxima)), rel=1e-4)
        pairs_only = [m for s, m in zip(train, maxima) if s in PAIRS]
        assert info['intensity_scale'][vendor] != pytest.approx(float(np.median(pairs_only)), rel=0.05)


def test_unpaired_writes_each_scan_as_its_own_subject(tmp_path):
    travellers, only1, only2 = PAIRS, ONLY_1[:2], ONLY_2[:2]
    dirs = write_scans(tmp_path / 'scans', (travellers + only1, travellers + only2))
    output = tmp_path / 'out'
    info = generate_in_process(*dirs, output, '--unpaired', '--test_ratio', '0.2')
    splits = info['subjects']
    # 8 people x 0.2 -> 2 test subjects, drawn from those scanned on both vendors
    assert len(splits['testset']) == 2 and set(splits['testset']) <= set(travellers)
    for vendor, folder in zip(VENDORS, dirs):
        assert sorted(os.listdir(output / 'testset' / vendor)) == sorted(f'{s}.nii.gz' for s in splits['testset'])
        for name in os.listdir(output / 'testset' / vendor):
            assert filecmp.cmp(output / 'testset' / vendor / name, os.path.join(folder, name), shallow=False)
    kept = [s for s in travellers if s not in splits['testset']]
    expected_folders = [f'{s}_{v}' for s in kept for v in VENDORS] + only1 + only2
    assert sorted(splits['trainset'] + splits['evalset']) == sorted(expected_folders)
    for split in ('trainset', 'evalset'):
        assert sorted(os.listdir(output / split)) == sorted(splits[split])
        for folder in splits[split]:
            vendor = folder.rsplit('_', 1)[1] if folder.rsplit('_', 1)[1] in VENDORS else (
                VENDORS[0] if folder in only1 else VENDORS[1])
            assert folder_keys(str(output), split, folder) == {(vendor,)}, folder
    for subject in kept:  # the split stays by subject: both scans of one person in the same split
        assert len({split for split in ('trainset', 'evalset') for v in VENDORS
                    if f'{subject}_{v}' in splits[split]}) == 1
    subject = kept[0]
    split = 'trainset' if f'{subject}_{VENDORS[1]}' in splits['trainset'] else 'evalset'
    expected = normalised_canonical(os.path.join(dirs[1], f'{subject}.nii.gz'))
    for k in (10, 30):
        got = load_slice(output / split / f'{subject}_{VENDORS[1]}' / f'slice_{k:03d}.pkl')[VENDORS[1]]
        np.testing.assert_allclose(got[:, :, 0], expected[:, :, k], atol=2e-5)
    assert info['paired_subjects'] == [] and info['unpaired'] is True
    assert info['vendor_slices']['trainset']['pairs'] == 0 and info['vendor_slices']['evalset']['pairs'] == 0


def test_one_subject_of_each_kind_still_gives_each_vendor_an_evaluation_subject(tmp_path):
    """Split on its own, each group of one subject would train; the single-vendor ones evaluate instead, so
    the pair keeps training both directions."""
    dirs = write_scans(tmp_path / 'scans', (['pair', 's_only'], ['pair', 'p_only']))
    info = generate_in_process(*dirs, tmp_path / 'out')
    assert info['subjects'] == {'trainset': ['pair'], 'evalset': ['p_only', 's_only'], 'testset': []}


def test_test_subjects_are_held_out_exactly(tmp_path):
    """The benchmark layout: disjoint training subjects per vendor, travelling subjects held out as the test."""
    travellers = ['t_1', 't_2', 't_3']
    dirs = write_scans(tmp_path / 'scans', (travellers + ONLY_1[:3], travellers + ONLY_2[:3]))
    output = tmp_path / 'out'
    info = generate_in_process(*dirs, output, '--test_subjects', 't_1', 't_2', 't_3', 's_only_2',
                               '--test_ratio', '0.5')
    assert info['subjects']['testset'] == ['s_only_2', 't_1', 't_2', 't_3']
    assert sorted(os.listdir(output / 'testset' / VENDORS[0])) == ['s_only_2.nii.gz', 't_1.nii.gz', 't_2.nii.gz',
                                                                   't_3.nii.gz']
    assert sorted(os.listdir(output / 'testset' / VENDORS[1])) == ['t_1.nii.gz', 't_2.nii.gz', 't_3.nii.gz']
    assert sorted(info['subjects']['trainset'] + info['subjects']['evalset']) == \
        sorted(['s_only_1', 's_only_3'] + ONLY_2[:3])
    assert info['paired_subjects'] == []
    assert info['vendor_subjects'][VENDORS[1]]['testset'] == ['t_1', 't_2', 't_3']
    for vendor in VENDORS:
        assert info['vendor_subjects'][vendor]['trainset'] and info['vendor_subjects'][vendor]['evalset']


# ---- different voxel sizes ------------------------------------------------------------------------

@pytest.fixture(scope='module')
def two_spacings(tmp_path_factory):
    """SIEMENS scans at 4 mm of three people, Philips scans at 6 mm of three others."""
    root = tmp_path_factory.mktemp('spacings')
    return write_scans(root / 'scans', (['s_1', 's_2', 's_3'], ['p_1', 'p_2', 'p_3']), resolutions=(4, 6))


@pytest.fixture(scope='module')
def resampled(two_spacings, tmp_path_factory):
    output = tmp_path_factory.mktemp('resampled') / 'out'
    return str(output), generate_in_process(*two_spacings, output, '--voxel_size', '5')


def resampled_canonical(path, spacing):
    """nibabel directly: the canonical volume resampled (trilinear) to `spacing` mm."""
    return resample_to_output(nib.as_closest_canonical(nib.load(path)), (spacing,) * 3, order=1)


def test_voxel_size_resamples_every_volume_to_that_spacing(two_spacings, resampled):
    output, info = resampled
    assert info['voxel_size'] == [5.0, 5.0, 5.0]
    split_of = {s: split for split in ('trainset', 'evalset') for s in info['subjects'][split]}
    for folder, subject in zip(two_spacings, ('s_1', 'p_1')):
        path = os.path.join(folder, f'{subject}.nii.gz')
        image = nib.as_closest_canonical(nib.load(path))
        expected = resampled_canonical(path, 5)
        extent = (np.array(image.shape) - 1) * np.array(image.header.get_zooms()[:3])
        assert np.all(np.abs(np.array(expected.shape) - (extent / 5 + 1)) <= 1.5), (expected.shape, extent)
        data = expected.get_fdata()
        unit = np.clip(data / percentile_of_foreground(data), 0, 1)
        slices = os.path.join(output, split_of[subject], subject)
        assert len(slice_files(slices)) == data.shape[2]
        assert list(info['slice_size']) == list(data.shape[:2])
        for k in range(4, data.shape[2], 6):
            sample = load_slice(os.path.join(slices, f'slice_{k:03d}.pkl'))
            (vendor, got), = sample.items()
            assert got.shape == data.shape[:2] + (1,)
            np.testing.assert_allclose(got[:, :, 0], unit[:, :, k], atol=1e-4, err_msg=f'{subject} slice {k}')


def test_inference_resamples_to_the_experiment_spacing_and_back(two_spacings, resampled, tmp_path):
    """An experiment made from the 5 mm dataset harmonizes a 4 mm scan stored LPS: the generator sees the
    scan at 5 mm, the output is on the input's own grid (shape and affine)."""
    import torch
    import inference_nii
    from model.generator import Generator
    output, info = resampled
    experiment = tmp_path / 'results' / 'exp'
    (experiment / 'model').mkdir(parents=True)
    (experiment / 'arguments.txt').write_text(json.dumps({'vendor1': VENDORS[0], 'vendor2': VENDORS[1],
                                                          'ngf': 8, 'n_res_blocks': 2}))
    shutil.copy(os.path.join(output, 'dataset_info.json'), experiment / 'dataset_info.json')
    torch.manual_seed(0)
    weights = experiment / 'model' / 'netG_S_to_P_epoch_1.pth'
    torch.save(Generator(ngf=8, n_res_blocks=2).state_dict(), weights)
    source = reoriented(nib.load(os.path.join(two_spacings[0], 's_2.nii.gz')), 'LPS')
    (tmp_path / 'in').mkdir()
    nib.save(source, tmp_path / 'in' / 's_2.nii.gz')
    failed = inference_nii.main(str(tmp_path / 'in'), str(tmp_path / 'out'), experiment='exp', epoch=1,
                                results_root=str(tmp_path / 'results'), device='cpu')
    assert failed == []
    result = nib.load(tmp_path / 'out' / 's_2_harmonized.nii.gz')
    assert result.shape == source.shape
    np.testing.assert_allclose(result.affine, source.affine, atol=1e-5)

    # the recipe written out with nibabel and torch
    canonical = nib.as_closest_canonical(source)
    native = canonical.get_fdata()
    coarse = resample_to_output(canonical, (5, 5, 5), order=1)
    data = coarse.get_fdata()
    unit = np.clip(data / percentile_of_foreground(data), 0, 1).astype(np.float32)
    generator = Generator(ngf=8, n_res_blocks=2)
    generator.load_state_dict(torch.load(weights, weights_only=True))
    with torch.no_grad():
        fake = ((generator.eval()(torch.from_numpy(np.moveaxis(unit, 2, 0)[:, None].copy()) * 2 - 1) + 1) / 2)
    fake = np.moveaxis(fake.clamp(0, 1)[:, 0].numpy(), 0, 2)
    fake[data <= 0] = 0
    back = resample_from_to(nib.Nifti1Image(fake, coarse.affine), canonical, order=1).get_fdata()
    back = np.clip(back, 0, 1) * info['intensity_scale'][VENDORS[1]]
    back[native <= 0] = 0
    want = apply_orientation(back, ornt_transform(axcodes2ornt('RAS'), io_orientation(source.affine)))
    got = np.asarray(result.dataobj, dtype=np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-4 * info['intensity_scale'][VENDORS[1]])


def test_inference_refuses_a_voxel_size_that_is_not_three_spacings(tmp_path):
    import inference_nii
    from utils.errors import UserError
    for spacing, expected in ((None, None), ([2, 2.5, 3], (2.0, 2.5, 3.0))):
        (tmp_path / 'dataset_info.json').write_text(json.dumps({'voxel_size': spacing}))
        assert inference_nii.training_spacing(str(tmp_path)) == expected
    (tmp_path / 'dataset_info.json').write_text(json.dumps({'voxel_size': [0, 1]}))
    with pytest.raises(UserError, match='dataset_info.json: voxel_size'):
        inference_nii.training_spacing(str(tmp_path))


# ---- 2-D inputs -----------------------------------------------------------------------------------

def write_png(path, image, dtype):
    from PIL import Image
    Image.fromarray(image.astype(dtype)).save(path)


def write_tif(path, image, dtype):
    import tifffile
    tifffile.imwrite(path, image.astype(dtype))


def write_npy(path, image, dtype):
    np.save(path, image.astype(dtype))


SLICE_WRITERS = {
    's_png8': ('png', write_png, np.uint8, 250),
    's_png16': ('png', write_png, np.uint16, 60000),
    's_tif': ('tif', write_tif, np.float32, 3000.5),
    's_npy': ('npy', write_npy, np.float32, 1234.5),
}


def write_slice_folders(root, n_slices=12, subjects=SLICE_WRITERS, mismatch=None):
    """Sub-folder per subject of slices slice_1 ... slice_N; returns {subject: (vendor1 stack, vendor2 stack)}
    of the values as stored (the stacks are (N, H, W) in file-number order)."""
    base = np.asarray(mni_t1(4).dataobj, dtype=np.float32)
    stacks = {}
    for index, (subject, (ext, writer, dtype, top)) in enumerate(subjects.items()):
        a = subject_volume(base, index)[:, :, 18:18 + n_slices]
        b = second_vendor(a, index)
        volumes = []
        for vendor, volume in zip(VENDORS, (a, b)):
            scaled = volume / volume.max() * top
            if np.issubdtype(dtype, np.integer):
                scaled = np.rint(scaled)
            scaled = scaled.astype(dtype).astype(np.float32)
            folder = os.path.join(str(root), vendor, subject)
            os.makedirs(folder)
            numbers = list(range(1, n_slices + 1))
            if mismatch and subject == mismatch and vendor == VENDORS[1]:
                numbers[-1] += 1  # vendor 2 lacks the last name and has another one instead
            for k, number in enumerate(numbers):
                writer(os.path.join(folder, f'slice_{number}.{ext}'), scaled[:, :, k], dtype)
            volumes.append(np.moveaxis(scaled, 2, 0))
        stacks[subject] = volumes
    return [os.path.join(str(root), v) for v in VENDORS], stacks


def test_2d_slice_folders_in_natural_order(tmp_path):
    dirs, stacks = write_slice_folders(tmp_path / 'in')
    generate(*dirs, tmp_path / 'out', '--split_ratio', '0.75')
    with open(tmp_path / 'out' / 'dataset_info.json') as f:
        info = json.load(f)
    assert sorted(sum(info['subjects'].values(), [])) == sorted(SLICE_WRITERS)
    assert list(info['slice_size']) == [50, 59]
    for split in ('trainset', 'evalset'):
        for subject in info['subjects'][split]:
            folder = tmp_path / 'out' / split / subject
            assert len(slice_files(folder)) == 12
            for vendor, stack in zip(VENDORS, stacks[subject]):
                expected = np.clip(stack / percentile_of_foreground(stack), 0, 1)
                for k in range(12):  # slice_{k+1} -> slice_{k:03d}.pkl: slice_10 comes after slice_9, not slice_1
                    got = load_slice(folder / f'slice_{k:03d}.pkl')[vendor]
                    assert got.shape == (50, 59, 1) and got.dtype == np.float32
                    np.testing.assert_allclose(got[:, :, 0], expected[k], atol=2e-5,
                                               err_msg=f'{subject} {vendor} slice_{k + 1}')


def test_2d_slices_are_paired_by_file_name_not_position(tmp_path):
    """Vendor 2 of one subject has slice_1..11 and slice_13 (no slice_12): slice_12 must not be paired with
    slice_13. Either the subject is skipped with a message naming it, or only the 11 common slices are used."""
    subjects = dict(list(SLICE_WRITERS.items())[:3])
    subjects['s_mismatch'] = SLICE_WRITERS['s_npy']
    dirs, _ = write_slice_folders(tmp_path / 'in', subjects=subjects, mismatch='s_mismatch')
    result = run_generate('--vendor1_dir', dirs[0], '--vendor2_dir', dirs[1], '--output_dir', tmp_path / 'out',
                          '--split_ratio', '0.75')
    assert 'Traceback' not in result.stderr
    for split in ('trainset', 'evalset'):
        folder = tmp_path / 'out' / split / 's_mismatch'
        if folder.exists():
            assert len(slice_files(folder)) == 11, 'slice_12 of one vendor was paired with slice_13 of the other'
            return
    assert 's_mismatch' in result.stdout + result.stderr


# ---- size and grid ------------------------------------------------------------------------------

def test_image_size_pads_and_crops_centred(vendor_dirs, tmp_path):
    generate(*vendor_dirs, tmp_path / 'out', '--image_size', '40', '64')
    with open(tmp_path / 'out' / 'dataset_info.json') as f:
        info = json.load(f)
    assert list(info['slice_size']) == [40, 64]
    subject = info['subjects']['trainset'][0]
    expected = [normalised_canonical(os.path.join(d, f'{subject}.nii.gz')) for d in vendor_dirs]
    for k in (10, 24, 40):
        sample = load_slice(tmp_path / 'out' / 'trainset' / subject / f'slice_{k:03d}.pkl')
        for vendor, volume in zip(VENDORS, expected):
            # 50 rows -> 40: rows 5..44; 59 columns -> 64: 2 zero columns before, 3 after
            want = np.pad(volume[5:45, :, k], ((0, 0), (2, 3)))
            assert sample[vendor].shape == (40, 64, 1)
            np.testing.assert_allclose(sample[vendor][:, :, 0], want, atol=2e-5)


@pytest.fixture(scope='module')
def off_grid_dirs(tmp_path_factory):
    """Vendor 2 at 6 mm (stored LPS) while vendor 1 is at 4 mm: same anatomy, different grids."""
    root = tmp_path_factory.mktemp('offgrid')
    fine, coarse = mni_t1(4), mni_t1(6)
    fine_data, coarse_data = (np.asarray(i.dataobj, dtype=np.float32) for i in (fine, coarse))
    dirs = [root / v for v in VENDORS]
    for d in dirs:
        d.mkdir()
    for i in range(3):
        nib.save(nib.Nifti1Image(1000 * subject_volume(fine_data, 1), fine.affine), dirs[0] / f'subj_{i + 1:03d}.nii.gz')
        save_vendor2(second_vendor(subject_volume(coarse_data, 1), i), coarse.affine, dirs[1] / f'subj_{i + 1:03d}.nii.gz',
                     'LPS')
    return [str(d) for d in dirs]


def test_resample_puts_vendor2_on_vendor1_grid(off_grid_dirs, tmp_path):
    generate(*off_grid_dirs, tmp_path / 'out', '--resample')
    with open(tmp_path / 'out' / 'dataset_info.json') as f:
        info = json.load(f)
    assert list(info['slice_size']) == [50, 59]
    subject = info['subjects']['trainset'][0]
    folder = tmp_path / 'out' / 'trainset' / subject
    assert len(slice_files(folder)) == 48
    for k in (18, 24, 30):
        sample = load_slice(folder / f'slice_{k:03d}.pkl')
        assert sample[VENDORS[1]].shape == (50, 59, 1)
        assert sample[VENDORS[1]].min() >= 0 and sample[VENDORS[1]].max() <= 1
        assert correlation(sample[VENDORS[0]], sample[VENDORS[1]]) > 0.85


def test_different_grids_without_resample_is_an_error_naming_the_subject(off_grid_dirs, tmp_path):
    before = snapshot(*off_grid_dirs)
    result = run_generate('--vendor1_dir', off_grid_dirs[0], '--vendor2_dir', off_grid_dirs[1],
                          '--output_dir', tmp_path / 'out')
    assert result.returncode != 0
    assert 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith('error:')
    text = result.stdout + result.stderr
    assert 'subj_001' in text and '--resample' in text
    assert not os.path.exists(tmp_path / 'out' / 'trainset')
    assert snapshot(*off_grid_dirs) == before


# ---- the intensity function ---------------------------------------------------------------------

def test_normalise_denormalise_round_trip_and_robust_max():
    from utils.volume import denormalise, normalise, robust_max
    data = 1000 * np.asarray(mni_t1(6).dataobj, dtype=np.float32)
    data[0, 0, 0] = 50_000  # a hot voxel above the clip level
    scale = robust_max(data)
    assert scale == pytest.approx(float(np.percentile(data[data > 0], PERCENTILE)), rel=1e-6)
    normalised, used = normalise(data)
    assert used == pytest.approx(scale)
    assert normalised.dtype == np.float32 and normalised.min() >= 0 and normalised.max() <= 1
    back = denormalise(normalised, used)
    below = data <= scale
    np.testing.assert_allclose(back[below], data[below], rtol=1e-5, atol=1e-3)
    assert back[0, 0, 0] == pytest.approx(scale)  # clipped at the robust maximum
    # with a given scale (a vendor's typical one) the same holds
    normalised, used = normalise(data, 2 * scale)
    assert used == 2 * scale
    np.testing.assert_allclose(denormalise(normalised, used)[data <= 2 * scale], data[data <= 2 * scale],
                               rtol=1e-5, atol=1e-3)


# ---- bad input ----------------------------------------------------------------------------------

def assert_user_error(result, *names):
    assert result.returncode != 0, result.stdout + result.stderr
    assert 'Traceback' not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith('error:'), result.stderr
    for name in names:
        assert str(name) in result.stderr, (f'stderr does not name {name}; stdout: {result.stdout[-800:]}; '
                                            f'stderr: {result.stderr[-800:]}')


def copy_pair(vendor_dirs, dirs, subject='subj_001', as_name=None):
    for source, target in zip(vendor_dirs, dirs):
        shutil.copy(os.path.join(source, f'{subject}.nii.gz'), os.path.join(target, f'{as_name or subject}.nii.gz'))


BAD_FILES = ('four_d', 'two_d', 'corrupt', 'all_zero', 'off_grid')


def write_bad_pair(kind, dirs, vendor_dirs, name):
    """Vendor 1 of subject `name` is broken in the way `kind` says (vendor 2 is a good file); returns its path."""
    good = nib.load(os.path.join(vendor_dirs[0], 'subj_001.nii.gz'))
    data = np.asarray(good.dataobj, dtype=np.float32)
    path = os.path.join(dirs[0], f'{name}.nii.gz')
    shutil.copy(os.path.join(vendor_dirs[1], 'subj_001.nii.gz'), os.path.join(dirs[1], f'{name}.nii.gz'))
    if kind == 'four_d':
        nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), good.affine), path)
    elif kind == 'two_d':
        nib.save(nib.Nifti1Image(data[:, :, 24], good.affine), path)
    elif kind == 'corrupt':
        with open(os.path.join(vendor_dirs[0], 'subj_001.nii.gz'), 'rb') as f:
            raw = f.read()
        with open(path, 'wb') as f:
            f.write(raw[: len(raw) // 2])
    elif kind == 'all_zero':
        nib.save(nib.Nifti1Image(np.zeros_like(data), good.affine), path)
    elif kind == 'off_grid':
        nib.save(nib.Nifti1Image(data[:, :, :40], good.affine), path)
    return path


@pytest.mark.parametrize('kind', BAD_FILES)
def test_bad_volume_alone_is_an_error_naming_it(kind, vendor_dirs, tmp_path):
    dirs = [str(tmp_path / v) for v in VENDORS]
    for d in dirs:
        os.makedirs(d)
    path = write_bad_pair(kind, dirs, vendor_dirs, 'bad_subject')
    before = snapshot(*dirs)
    result = run_generate('--vendor1_dir', dirs[0], '--vendor2_dir', dirs[1], '--output_dir', tmp_path / 'out')
    assert snapshot(*dirs) == before
    assert not os.path.exists(tmp_path / 'out' / 'trainset')
    assert_user_error(result, os.path.basename(path) if kind != 'off_grid' else 'bad_subject')


def test_bad_volumes_among_good_ones_are_skipped_and_named(vendor_dirs, tmp_path):
    dirs = [str(tmp_path / v) for v in VENDORS]
    for d in dirs:
        os.makedirs(d)
    for i in range(1, 4):
        copy_pair(vendor_dirs, dirs, f'subj_{i:03d}')
    for kind in BAD_FILES:
        write_bad_pair(kind, dirs, vendor_dirs, f'bad_{kind}')
    before = snapshot(*dirs)
    result = generate(*dirs, tmp_path / 'out')
    text = result.stdout + result.stderr
    for kind in BAD_FILES:
        assert f'bad_{kind}' in text, f'the skipped {kind} subject is not named'
    with open(tmp_path / 'out' / 'dataset_info.json') as f:
        info = json.load(f)
    assert sorted(sum(info['subjects'].values(), [])) == ['subj_001', 'subj_002', 'subj_003']
    for split in ('trainset', 'evalset'):
        for subject in info['subjects'][split]:
            assert len(slice_files(tmp_path / 'out' / split / subject)) == 48
    assert snapshot(*dirs) == before


def test_missing_folder(vendor_dirs, tmp_path):
    missing = tmp_path / 'no_such_folder'
    result = run_generate('--vendor1_dir', missing, '--vendor2_dir', vendor_dirs[1], '--output_dir', tmp_path / 'o')
    assert_user_error(result, missing)
    assert not os.path.exists(tmp_path / 'o' / 'dataset_info.json')


def test_empty_folder(vendor_dirs, tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    before = snapshot(vendor_dirs[1])
    result = run_generate('--vendor1_dir', vendor_dirs[0], '--vendor2_dir', empty, '--output_dir', tmp_path / 'o')
    assert_user_error(result, empty)
    assert snapshot(vendor_dirs[1]) == before and os.listdir(empty) == []


def test_one_subject_per_vendor_and_no_pairs_leaves_no_evaluation_subject(vendor_dirs, tmp_path):
    dirs = [tmp_path / v for v in VENDORS]
    for d in dirs:
        d.mkdir()
    shutil.copy(os.path.join(vendor_dirs[0], 'subj_001.nii.gz'), dirs[0] / 'alpha.nii.gz')
    shutil.copy(os.path.join(vendor_dirs[1], 'subj_002.nii.gz'), dirs[1] / 'beta.nii.gz')
    before = snapshot(*dirs)
    result = run_generate('--vendor1_dir', dirs[0], '--vendor2_dir', dirs[1], '--output_dir', tmp_path / 'o')
    assert_user_error(result, 'SIEMENS', 'alpha', 'evaluation')
    assert snapshot(*dirs) == before
    assert not os.path.exists(tmp_path / 'o' / 'dataset_info.json')


def test_existing_dataset_is_not_overwritten_without_flag(vendor_dirs, tmp_path):
    output = tmp_path / 'existing'
    (output / 'trainset' / 'old_subject').mkdir(parents=True)
    (output / 'trainset' / 'old_subject' / 'slice_000.pkl').write_bytes(b'old slice')
    (output / 'dataset_info.json').write_text('{"old": true}')
    before = snapshot(output, *vendor_dirs)
    result = run_generate('--vendor1_dir', vendor_dirs[0], '--vendor2_dir', vendor_dirs[1], '--output_dir', output)
    assert_user_error(result, output)
    assert '--overwrite' in result.stderr
    assert snapshot(output, *vendor_dirs) == before
    # with --overwrite the old dataset is replaced
    generate(*vendor_dirs, output, '--overwrite')
    assert not (output / 'trainset' / 'old_subject').exists()
    with open(output / 'dataset_info.json') as f:
        assert json.load(f)['vendors'] == list(VENDORS)


# ---- make_demo_data -----------------------------------------------------------------------------

def test_make_demo_data_pairs_align_after_reorientation(tmp_path):
    from dataset.make_demo_data import make_demo_data
    paths = make_demo_data(str(tmp_path / 'demo'), subjects=3, voxel_size=6.0, background='zero')
    assert len(paths) == 6 and all(os.path.exists(p) for p in paths)
    codes = set()
    for stem in ('subj_001', 'subj_002', 'subj_003'):
        images = [nib.load(str(tmp_path / 'demo' / v / f'{stem}.nii.gz')) for v in VENDORS]
        codes |= {aff2axcodes(i.affine) for i in images}
        canon = [nib.as_closest_canonical(i) for i in images]
        assert canon[0].shape == canon[1].shape and len(canon[0].shape) == 3
        np.testing.assert_allclose(canon[0].affine, canon[1].affine, atol=1e-4)
        a, b = (c.get_fdata() for c in canon)
        zero_a, zero_b = a == 0, b == 0
        assert 0.2 < zero_a.mean() < 0.9  # a real zero background, and a real brain
        assert np.mean(zero_a != zero_b) < 0.01, 'the vendors do not share their zero background'
        centre = tuple(s // 2 for s in a.shape)
        assert a[centre] > 0 and b[centre] > 0
        mid = a.shape[2] // 2
        assert correlation(a[:, :, mid], b[:, :, mid]) > 0.7  # the same anatomy, aligned
    assert codes != {('R', 'A', 'S')}, 'every demo file is stored RAS'
