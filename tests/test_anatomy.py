"""utils/anatomy.py, the one definition of which voxels are the anatomy, and the steps that use it, on real MRI:
demo scans from dataset/make_demo_data.py (the MNI152 template through a random warp, two scanner models, Rician
noise in the air or a zero background, optionally a head of skull, marrow, muscle, fat and skin around the brain),
at 4 mm, with the brain masks it writes, and the MNI152 T1 itself.

- the foreground found in a scan: zero background keeps `data > 0`; noise in the air is cut off, the ventricles
  stay in, the air's voxels stay out; in a head the brain is the reference region of the normalisation;
- a zero-background scan is normalised exactly as before;
- dataset generation from noisy scans: air 0 in the training slices, intensity scales of the brain (with and
  without --mask_dir);
- bad masks and a scan of pure noise: one-line errors naming the file, nothing written;
- evaluate.py on noisy scans, with and without --mask_dir;
- inference keeps the input's own air (in the output's units) outside the anatomy.

Expected values are computed with nibabel, numpy and scipy from the files and the masks make_demo_data writes.
"""
import hashlib
import json
import os
import pickle
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from conftest import mni_t1
from utils.errors import UserError, run_cli

VENDORS = ('SIEMENS', 'Philips')
PERCENTILE = 99.5
VOXEL_MM = 4.0


# ---- helpers ------------------------------------------------------------------------------------

def canonical(path):
    """A NIfTI's voxels in RAS+ orientation (float32), as the project's steps see them."""
    return np.asarray(nib.as_closest_canonical(nib.load(str(path))).dataobj, dtype=np.float32)


def brain_mask(demo, vendor, stem):
    """The brain mask make_demo_data wrote for a scan, in RAS+ orientation."""
    return canonical(os.path.join(demo, 'masks', vendor, f'{stem}.nii.gz')) > 0


def scan_path(demo, vendor, stem):
    return os.path.join(demo, vendor, f'{stem}.nii.gz')


def stems(demo):
    return sorted(name[:-len('.nii.gz')] for name in os.listdir(os.path.join(demo, VENDORS[0])))


def dice(a, b):
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def border(volume):
    """The in-plane faces of an (X, Y, Z) volume: air in every demo scan."""
    return np.concatenate([volume[0].ravel(), volume[-1].ravel(), volume[:, 0].ravel(), volume[:, -1].ravel()])


def percentile_of(data, region):
    return float(np.percentile(data[region], PERCENTILE))


def tree(folder):
    """{relative path: sha256 or 'dir'} of everything under folder."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            found[os.path.relpath(os.path.join(root, name), folder)] = 'dir'
        for name in files:
            path = os.path.join(root, name)
            with open(path, 'rb') as f:
                found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


def one_error_line(err, *names):
    """The last stderr line is the one `error:` line and names every one of `names`; returns it."""
    assert 'Traceback' not in err, err
    lines = [line.strip() for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith('error:'), err
    for name in names:
        assert str(name) in lines[-1], f'{name} not named in: {lines[-1]}'
    return lines[-1]


def rician_noise(shape, sigma, seed=0):
    """The magnitude of complex Gaussian noise: the air of a scan with nothing in it."""
    rng = np.random.default_rng(seed)
    return np.hypot(sigma * rng.standard_normal(shape), sigma * rng.standard_normal(shape)).astype(np.float32)


# ---- data (once per module) ---------------------------------------------------------------------

def demo(tmp_path_factory, name, subjects, **options):
    from dataset.make_demo_data import make_demo_data
    folder = str(tmp_path_factory.mktemp(name) / 'scans')
    make_demo_data(folder, subjects=subjects, voxel_size=VOXEL_MM, **options)
    return folder


@pytest.fixture(scope='module')
def noisy(tmp_path_factory):
    """4 subjects, Rician noise in the air (as scanners write magnitude images), brain only."""
    return demo(tmp_path_factory, 'noisy', 4, background='noise')


@pytest.fixture(scope='module')
def zero(tmp_path_factory):
    """2 skull-stripped subjects: every voxel outside the brain exactly 0."""
    return demo(tmp_path_factory, 'zero', 2, background='zero')


@pytest.fixture(scope='module')
def head(tmp_path_factory):
    """2 unstripped subjects: skull, marrow, muscle, fat and skin around the brain, noise in the air."""
    return demo(tmp_path_factory, 'head', 2, background='noise', head=True)


def generate(noisy, output, *flags):
    from dataset import generate_paired_dataset
    generate_paired_dataset.main(['--vendor1_dir', os.path.join(noisy, VENDORS[0]),
                                  '--vendor2_dir', os.path.join(noisy, VENDORS[1]),
                                  '--output_dir', str(output), '--split_ratio', '0.5', *map(str, flags)])
    with open(os.path.join(output, 'dataset_info.json')) as f:
        return json.load(f)


@pytest.fixture(scope='module')
def generated(noisy, tmp_path_factory):
    """The dataset generated from the noisy scans, the anatomy found in each scan."""
    output = tmp_path_factory.mktemp('generated') / 'dataset'
    return str(output), generate(noisy, output)


def fake_experiment(root, info=None):
    """An experiment folder inference_nii.py accepts: an untrained small generator as epoch 1 of S->P."""
    import torch
    from model.generator import Generator
    experiment = os.path.join(root, 'results', 'exp')
    os.makedirs(os.path.join(experiment, 'model'))
    with open(os.path.join(experiment, 'arguments.txt'), 'w') as f:
        json.dump({'vendor1': VENDORS[0], 'vendor2': VENDORS[1], 'ngf': 8, 'n_res_blocks': 2}, f)
    with open(os.path.join(experiment, 'dataset_info.json'), 'w') as f:
        json.dump(info or {'intensity_scale': {VENDORS[0]: 700.0, VENDORS[1]: 2900.0}}, f)
    torch.manual_seed(0)
    torch.save(Generator(ngf=8, n_res_blocks=2).state_dict(),
               os.path.join(experiment, 'model', 'netG_S_to_P_epoch_1.pth'))
    return os.path.join(root, 'results')


# ---- 1. the foreground of real scans ------------------------------------------------------------

def test_zero_background_keeps_the_non_zero_voxels(zero):
    from utils.anatomy import anatomy_mask
    volumes = [canonical(scan_path(zero, vendor, stem)) for vendor in VENDORS for stem in stems(zero)]
    volumes.append(np.asarray(mni_t1(4).dataobj, dtype=np.float32))
    for data in volumes:
        assert (data == 0).any() and (data > 0).any()
        np.testing.assert_array_equal(anatomy_mask(data), data > 0)


def test_noise_in_the_air_is_cut_off_and_the_ventricles_stay_in(noisy):
    from utils.anatomy import anatomy_mask
    for vendor in VENDORS:
        for stem in stems(noisy):
            data = canonical(scan_path(noisy, vendor, stem))
            brain = brain_mask(noisy, vendor, stem)
            assert (border(data) > 0).mean() > 0.5  # the air is noise, not zeros: the old rule took all of it
            anatomy = anatomy_mask(data, scan_path(noisy, vendor, stem))
            assert dice(anatomy, brain) > 0.95, (vendor, stem, dice(anatomy, brain))
            assert not border(anatomy).any()  # none of the air on the faces of the field of view
            far = ~ndimage.binary_dilation(brain, iterations=3)  # air 12 mm or more from the brain
            assert np.count_nonzero(anatomy & far) == 0
            # no holes: the dark CSF of the ventricles inside the brain is anatomy, as bright as the noise or not
            np.testing.assert_array_equal(anatomy, ndimage.binary_fill_holes(anatomy))
            assert np.count_nonzero(brain & ~anatomy) <= 0.001 * np.count_nonzero(brain)
            core = ndimage.binary_erosion(brain, iterations=3)
            dark = core & (data < np.percentile(data[core], 5))  # the darkest deep-brain voxels: the ventricles
            assert dark.sum() > 10 and anatomy[dark].all()


def test_in_a_head_the_brain_sets_the_robust_maximum(head):
    from utils.anatomy import anatomy_mask, reference_region
    from utils.volume import robust_max
    for vendor in VENDORS:
        for stem in stems(head):
            data = canonical(scan_path(head, vendor, stem))
            brain = brain_mask(head, vendor, stem)
            anatomy = anatomy_mask(data, scan_path(head, vendor, stem))
            assert np.count_nonzero(anatomy & brain) > 0.99 * np.count_nonzero(brain)
            assert anatomy.sum() > 1.5 * brain.sum(), 'the scalp and skull are anatomy too'
            assert not border(anatomy).any()
            region = reference_region(data, anatomy)
            assert not (region & ~anatomy).any()
            assert dice(region, brain) > 0.9, (vendor, stem, dice(region, brain))
            assert region.sum() < 0.7 * anatomy.sum()
            values = {'region': robust_max(data, region), 'brain': percentile_of(data, brain),
                      'head': robust_max(data, anatomy)}
            assert abs(values['region'] / values['brain'] - 1) < 0.05, (vendor, stem, values)
            # SIEMENS' scalp fat (1.3 x white matter) is brighter than its brain: over the whole head the robust
            # maximum lands on fat. Philips' fat (1.15 x white matter, blurred by a wider PSF) does not reach above the
            # brain's, so only SIEMENS tells the region from the head here.
            if vendor == 'SIEMENS':
                assert values['head'] > 1.15 * values['brain'], (vendor, stem, values)


def test_without_a_head_the_reference_region_is_the_whole_anatomy(zero, noisy):
    from utils.anatomy import anatomy_mask, reference_region
    volumes = [canonical(scan_path(folder, vendor, stem)) for folder in (zero, noisy) for vendor in VENDORS
               for stem in stems(folder)]
    volumes.append(np.asarray(mni_t1(4).dataobj, dtype=np.float32))
    for data in volumes:
        anatomy = anatomy_mask(data)
        np.testing.assert_array_equal(reference_region(data, anatomy), anatomy)


# ---- 2. zero background: results as before --------------------------------------------------------

def test_zero_background_is_normalised_as_before(zero):
    from utils.anatomy import anatomy_mask, reference_region
    from utils.volume import anatomy_only, normalise
    volumes = [canonical(scan_path(zero, vendor, stem)) for vendor in VENDORS for stem in stems(zero)]
    volumes.append(np.asarray(mni_t1(4).dataobj, dtype=np.float32))
    for data in volumes:
        anatomy = anatomy_mask(data)
        unit, scale = normalise(data, region=reference_region(data, anatomy))
        old = np.clip(data / np.percentile(data[data > 0], 99.5), 0, 1)
        assert scale == np.percentile(data[data > 0], 99.5)
        np.testing.assert_array_equal(unit, old)
        np.testing.assert_array_equal(anatomy_only(unit, anatomy), unit)


# ---- 3. dataset generation from noisy scans --------------------------------------------------------

def pickles(dataset, info):
    """{(subject, slice index): {vendor: (H, W) array}} of the train and eval slices."""
    found = {}
    for split in ('trainset', 'evalset'):
        for subject in info['subjects'][split]:
            folder = os.path.join(dataset, split, subject)
            for name in sorted(os.listdir(folder)):
                with open(os.path.join(folder, name), 'rb') as f:
                    sample = pickle.load(f)
                found[subject, int(name[len('slice_'):-len('.pkl')])] = {v: a[..., 0] for v, a in sample.items()}
    return found


def check_scales(noisy, info):
    """Each vendor's intensity scale is its brain's 99.5th percentile (median over the training subjects)."""
    for vendor in VENDORS:
        brains = [percentile_of(canonical(scan_path(noisy, vendor, stem)), brain_mask(noisy, vendor, stem))
                  for stem in info['vendor_subjects'][vendor]['trainset']]
        expected = float(np.median(brains))
        assert abs(info['intensity_scale'][vendor] / expected - 1) < 0.05, (vendor, info['intensity_scale'], expected)


def test_generation_sets_the_air_to_zero(noisy, generated):
    dataset, info = generated
    slices = pickles(dataset, info)
    assert len(info['subjects']['trainset']) == 2 and len(info['subjects']['evalset']) == 2
    assert info['skipped'] == []
    for stem in info['subjects']['trainset'] + info['subjects']['evalset']:
        for vendor in VENDORS:
            brain = brain_mask(noisy, vendor, stem)
            written = np.stack([slices[stem, k][vendor] for k in range(brain.shape[2])], axis=-1)
            assert written.shape == brain.shape
            assert written.min() >= 0 and written.max() <= 1
            # the brain and 12 mm around it (the anatomy found fills air pockets that an axial slice encloses, at
            # the skull base up to 3 voxels from the brain)
            near = ndimage.binary_dilation(brain, iterations=3)
            assert np.count_nonzero(written[~near]) == 0, (stem, vendor)  # the air: exactly 0
            assert (border(written) == 0).all()
            assert (written[ndimage.binary_erosion(brain)] > 0).all()  # the anatomy: above the background
            assert np.count_nonzero(written) > 0.95 * brain.sum()
    check_scales(noisy, info)


def test_generation_with_masks_keeps_exactly_the_masked_voxels(noisy, tmp_path):
    info = generate(noisy, tmp_path / 'dataset', '--mask_dir', os.path.join(noisy, 'masks'))
    assert info['masks'] == os.path.abspath(os.path.join(noisy, 'masks'))
    slices = pickles(str(tmp_path / 'dataset'), info)
    for stem in info['subjects']['trainset'] + info['subjects']['evalset']:
        for vendor in VENDORS:
            brain = brain_mask(noisy, vendor, stem)
            written = np.stack([slices[stem, k][vendor] for k in range(brain.shape[2])], axis=-1)
            np.testing.assert_array_equal(written > 0, brain)
    check_scales(noisy, info)


# ---- 4. bad masks and scans without a head: one-line errors, nothing written ------------------------

def mask_folder(noisy, tmp_path, spoil):
    """A copy of the demo masks with SIEMENS subj_002's spoiled by `spoil(path, mask image)`; returns (folder, the
    spoiled mask's path)."""
    folder = tmp_path / 'masks'
    shutil.copytree(os.path.join(noisy, 'masks'), folder)
    path = str(folder / VENDORS[0] / 'subj_002.nii.gz')
    spoil(path, nib.load(path))
    return str(folder), path


def other_shape(path, image):
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[1:], image.affine), path)


def empty(path, image):
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), path)


def full(path, image):
    nib.save(nib.Nifti1Image(np.ones(image.shape, np.uint8), image.affine), path)


def missing(path, image):
    os.remove(path)


@pytest.mark.parametrize('spoil', [other_shape, empty, full, missing])
def test_generation_refuses_a_bad_mask(spoil, noisy, generated, tmp_path, capsys):
    from dataset import generate_paired_dataset
    masks, spoiled = mask_folder(noisy, tmp_path, spoil)
    output = tmp_path / 'dataset'
    shutil.copytree(generated[0], output)  # an earlier dataset, which --overwrite would replace
    before = tree(output)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_cli(generate_paired_dataset.main, ['--vendor1_dir', os.path.join(noisy, VENDORS[0]),
                                               '--vendor2_dir', os.path.join(noisy, VENDORS[1]),
                                               '--output_dir', str(output), '--split_ratio', '0.5',
                                               '--mask_dir', masks, '--overwrite'])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    if spoil is missing:  # the scan without a mask, and where it was looked for
        line = one_error_line(err, scan_path(noisy, VENDORS[0], 'subj_002'), masks)
    else:
        line = one_error_line(err, spoiled)
    assert line.count('(') == line.count(')')
    assert tree(output) == before


def test_a_scan_of_pure_noise_has_no_head(noisy):
    from utils.anatomy import anatomy_mask
    data = canonical(scan_path(noisy, VENDORS[0], 'subj_001'))
    sigma = float(np.median(border(data))) / 1.1774  # the median of a Rayleigh distribution is 1.1774 sigma
    with pytest.raises(UserError, match='noise.nii.gz: no head stands out of the background noise') as error:
        anatomy_mask(rician_noise(data.shape, sigma), 'some/folder/noise.nii.gz')
    assert '\n' not in str(error.value)


def test_inference_fails_a_scan_of_pure_noise(noisy, tmp_path, capsys):
    import inference_nii
    results = fake_experiment(str(tmp_path))
    source = nib.load(scan_path(noisy, VENDORS[0], 'subj_001'))
    inputs = tmp_path / 'in'
    inputs.mkdir()
    shutil.copy(scan_path(noisy, VENDORS[0], 'subj_001'), inputs / 'subj_001.nii.gz')
    noise = str(inputs / 'noise.nii.gz')
    sigma = float(np.median(border(canonical(source.get_filename())))) / 1.1774
    nib.save(nib.Nifti1Image(rician_noise(source.shape, sigma), source.affine), noise)
    output = tmp_path / 'out'
    output.mkdir()
    (output / 'earlier.txt').write_text('kept')
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_cli(inference_nii.cli, ['--experiment', 'exp', '--epoch', '1', '--save_dir', results, '--src_vendor',
                                    VENDORS[0], '--trg_vendor', VENDORS[1], '--input_dir', str(inputs),
                                    '--output_dir', str(output), '--device', 'cpu'])
    assert exit_.value.code == 1
    captured = capsys.readouterr()
    assert 'Traceback' not in captured.out + captured.err
    failed = [line.strip() for line in (captured.out + captured.err).splitlines()
              if line.strip().startswith('failed:') and noise in line]
    assert len(failed) == 1 and 'no head stands out of the background noise' in failed[0], captured
    assert sorted(os.listdir(output)) == ['earlier.txt', 'subj_001_harmonized.nii.gz']  # the other scan is done
    assert (output / 'earlier.txt').read_text() == 'kept'


def test_generation_skips_a_scan_of_pure_noise(noisy, tmp_path, capsys):
    scans = tmp_path / 'scans'
    for vendor in VENDORS:
        shutil.copytree(os.path.join(noisy, vendor), scans / vendor)
    noise = str(scans / VENDORS[1] / 'subj_004.nii.gz')
    image = nib.load(noise)
    sigma = float(np.median(border(canonical(noise)))) / 1.1774
    nib.save(nib.Nifti1Image(rician_noise(image.shape, sigma, seed=1), image.affine), noise)
    capsys.readouterr()
    info = generate(str(scans), tmp_path / 'dataset')
    err = capsys.readouterr().err
    assert any(line.strip().startswith('skipped:') and noise in line for line in err.splitlines()), err
    assert len(info['skipped']) == 1 and noise in info['skipped'][0]
    assert 'subj_004' not in info['subjects']['trainset'] + info['subjects']['evalset']


# ---- 5. evaluate.py on noisy scans ---------------------------------------------------------------

EVALUATED, TARGETS = ('subj_004',), ('subj_001', 'subj_002')


@pytest.fixture(scope='module')
def study(noisy, tmp_path_factory):
    """The target vendor's (Philips) scan of subject 4 as the 'harmonized' output and as the reference, SIEMENS's
    as the source, Philips scans of subjects 1 and 2 as the target vendor, and one folder of the Philips masks of
    all three (evaluate.py finds masks by stem)."""
    root = tmp_path_factory.mktemp('study')
    folders = {name: root / name for name in ('harmonized', 'source', 'reference', 'target', 'masks')}
    for folder in folders.values():
        folder.mkdir()
    for stem in EVALUATED:
        shutil.copy(scan_path(noisy, VENDORS[1], stem), folders['harmonized'] / f'{stem}_harmonized.nii.gz')
        shutil.copy(scan_path(noisy, VENDORS[0], stem), folders['source'] / f'{stem}.nii.gz')
        shutil.copy(scan_path(noisy, VENDORS[1], stem), folders['reference'] / f'{stem}.nii.gz')
    for stem in TARGETS:
        shutil.copy(scan_path(noisy, VENDORS[1], stem), folders['target'] / f'{stem}.nii.gz')
    for stem in EVALUATED + TARGETS:
        shutil.copy(os.path.join(noisy, 'masks', VENDORS[1], f'{stem}.nii.gz'), folders['masks'] / f'{stem}.nii.gz')
    return {name: str(folder) for name, folder in folders.items()}


@pytest.mark.parametrize('masks', [False, True], ids=['found', 'mask_dir'])
def test_evaluate_on_noisy_scans(study, masks, tmp_path):
    """The figures are those of the brain, not of the air: were the air's noise foreground (the rule for a zero
    background, `data > 0`), it would be most of the voxels, every method's SSIM would fall with Nyul's
    below the input's, and the vendor distances would shrink towards 0."""
    import evaluate
    from utils.evaluation import HARMONIZED, NYUL, UNHARMONIZED
    output = tmp_path / 'evaluation'
    failed = evaluate.main(['--harmonized_dir', study['harmonized'], '--target_dir', study['target'],
                            '--source_dir', study['source'], '--reference_dir', study['reference'],
                            '--output_dir', str(output)] + (['--mask_dir', study['masks']] if masks else []))
    assert failed == []
    table = pd.read_csv(output / 'metrics.csv')
    for stem in EVALUATED:
        rows = table[table['volume'] == stem].set_index('method')
        harmonized, unharmonized, nyul = rows.loc[HARMONIZED], rows.loc[UNHARMONIZED], rows.loc[NYUL]
        assert harmonized['SSIM'] > 0.99, rows.to_string()
        assert 0.85 < unharmonized['SSIM'] < 0.95, rows.to_string()
        assert nyul['SSIM'] > unharmonized['SSIM'] + 0.01, rows.to_string()
        # A real target-vendor scan differs from two other target subjects' pooled histogram by its own anatomy and
        # shading, so on these few subjects its distance is not a small fraction of the input's (Nyul, fitted to
        # that pool, is).
        assert unharmonized['vendor_distance'] > 0.035, rows.to_string()
        assert harmonized['vendor_distance'] < 0.7 * unharmonized['vendor_distance'], rows.to_string()
        assert nyul['vendor_distance'] < 0.25 * unharmonized['vendor_distance'], rows.to_string()
        assert os.path.isfile(output / 'previews' / f'{stem}.png')


# ---- 6. inference keeps the input's air -----------------------------------------------------------

def test_inference_keeps_the_input_air_in_the_output_units(noisy):
    import torch
    import inference_nii
    from model.generator import Generator
    from utils.anatomy import anatomy_mask, reference_region
    torch.manual_seed(0)
    generator = Generator(ngf=8, n_res_blocks=2).eval()
    scale = 2900.0
    path = scan_path(noisy, VENDORS[0], 'subj_003')  # stored SRA: the output comes back in that order
    stored = nib.load(path)
    image, output, _, _ = inference_nii.harmonize_volume(generator, path, scale, 16, torch.device('cpu'))
    assert output.shape == stored.shape
    data = canonical(path)
    result = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(output, stored.affine)).dataobj)
    anatomy = anatomy_mask(data)
    robust = float(np.percentile(data[reference_region(data, anatomy)], PERCENTILE))
    # the reference region here is the whole anatomy, whose maximum is the brain's
    assert abs(robust / percentile_of(data, brain_mask(noisy, VENDORS[0], 'subj_003')) - 1) < 0.01
    air = ~anatomy
    assert air.mean() > 0.3 and (data[air] > 0).mean() > 0.9
    np.testing.assert_allclose(result[air], data[air] * (scale / robust), rtol=1e-5, atol=1e-3)
    # relative to the tissue the air is as dark as it was: the output's air over the target scale
    np.testing.assert_allclose(np.median(border(result)) / scale, np.median(border(data)) / robust, rtol=1e-4)
    inside = np.abs(result[anatomy] - data[anatomy] * (scale / robust)) > 1e-3 * scale
    assert inside.mean() > 0.9  # the generator's work
