"""utils/bias_field.py (N4), utils/vendor_classifier.py and what evaluate.py does with them, on real MRI: the MNI152
T1 template at 4 mm (conftest.mni_t1) and demo scans from dataset/make_demo_data.py at 4 mm (noise in the air, the
brain masks it writes).

1. N4 removes a known smooth multiplicative shading from a real brain and keeps its anatomy; an unshaded brain
   changes little; the fit uses the brain, not zero voxels a generous mask takes in.
2. The vendor classifier, trained on the two demo vendors' scans of other subjects, calls a held-out subject's
   vendor-2 scan vendor 2 and its vendor-1 scan vendor 1.
3. It is not fooled by an intensity curve where the vendors differ in sharpness and noise: the demo's vendor-1
   scans histogram-matched to vendor 2, and on the template a gamma curve or histogram matching of vendor A where
   vendor B is a blurred A.
4. fit_without(subject) trains on every scan but that subject's, and gives None where a vendor has none left.
5. evaluate.py end to end: the N4 + Nyul rows, the vendor_classifier column, a --target_dir of one usable scan,
   a subject without its mask in --mask_dir.
"""
import os
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from conftest import mni_t1, subject_volume

VENDORS = ('SIEMENS', 'Philips')  # make_demo_data's vendor 1 and vendor 2
VOXEL_MM = 4.0
SUBJECTS = 8
SOURCE_TRAIN, TARGET_TRAIN, HELD_OUT = (1, 2, 3), (4, 5, 6), (7, 8)  # demo subjects (test 2, 3)


def stem(subject):
    return f'subj_{subject:03d}'


def scan_path(demo, vendor, subject):
    return os.path.join(demo, vendor, f'{stem(subject)}.nii.gz')


def mask_path(demo, vendor, subject):
    return os.path.join(demo, 'masks', vendor, f'{stem(subject)}.nii.gz')


def log_ratio_std(a, b, region):
    """Spread of log(a / b) in region: 0 where a and b differ by a constant factor."""
    return float(np.std(np.log(a[region] / b[region])))


def correlation(a, b, region):
    return float(np.corrcoef(a[region], b[region])[0, 1])


# ---- data (once per module) ---------------------------------------------------------------------

@pytest.fixture(scope='module')
def mni():
    """(data, brain) of the MNI T1 at 4 mm. The brain is `data > 0.01`, and everything outside it is set to 0:
    nilearn's resampled template holds denormal positives (~1e-45) in about half of the field of view around
    the brain, which `data > 0` would count as brain."""
    image = mni_t1(4)
    data = np.asarray(image.dataobj, dtype=np.float32)
    brain = data > 0.01
    assert 0.15 < brain.mean() < 0.3
    return np.where(brain, data, 0).astype(np.float32), brain


def shading(brain, strength=1.0):
    """A smooth multiplicative field of about +-30 % over the brain: exp of linear ramps along x and y and a
    quadratic one along z, in the brain's own half-extents."""
    points = np.argwhere(brain)
    centre, half = points.mean(axis=0), (points.max(axis=0) - points.min(axis=0)) / 2
    x, y, z = np.meshgrid(*[(np.arange(n) - centre[i]) / half[i] for i, n in enumerate(brain.shape)], indexing='ij')
    return np.exp(strength * (0.25 * x + 0.15 * y - 0.15 * z ** 2)).astype(np.float32)


@pytest.fixture(scope='module')
def n4_shaded(mni):
    """(shaded volume, its N4 correction with the brain mask)."""
    from utils.bias_field import n4_correct
    data, brain = mni
    shaded = data * shading(brain)
    return shaded, n4_correct(shaded, brain, (VOXEL_MM,) * 3)


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    """8 subjects at 4 mm, Rician noise in the air, brain only, with the brain masks."""
    from dataset.make_demo_data import make_demo_data
    folder = str(tmp_path_factory.mktemp('demo') / 'scans')
    make_demo_data(folder, subjects=SUBJECTS, voxel_size=VOXEL_MM, background='noise')
    return folder


def normalised(path):
    """(raw canonical data, anatomy found in it, the volume normalised as evaluation normalises it)."""
    from utils.anatomy import anatomy_mask
    from utils.evaluation import load_canonical, unit_volume
    data = np.asarray(load_canonical(path).dataobj, dtype=np.float32)
    anatomy = anatomy_mask(data, path)
    return data, anatomy, unit_volume(data, path, anatomy)


@pytest.fixture(scope='module')
def demo_scans(demo):
    """{(vendor, subject): (data, anatomy, unit volume, patch features)} of every demo scan."""
    from utils.vendor_classifier import patch_features
    scans = {}
    for vendor in VENDORS:
        for subject in range(1, SUBJECTS + 1):
            data, anatomy, unit = normalised(scan_path(demo, vendor, subject))
            scans[vendor, subject] = (data, anatomy, unit, patch_features(unit, anatomy))
    return scans


@pytest.fixture(scope='module')
def demo_model(demo_scans):
    """The classifier trained on vendor-1 scans of subjects 1-3 and vendor-2 scans of subjects 4-6."""
    from utils.vendor_classifier import VendorClassifier
    classifier = VendorClassifier([(stem(s), demo_scans[VENDORS[0], s][3]) for s in SOURCE_TRAIN],
                                  [(stem(s), demo_scans[VENDORS[1], s][3]) for s in TARGET_TRAIN])
    return classifier.fit_without(stem(HELD_OUT[0]))


# ---- 1. N4 on real MRI with a known shading -----------------------------------------------------

def test_n4_removes_a_known_shading_and_keeps_the_anatomy(mni, n4_shaded):
    from utils.bias_field import n4_correct
    data, brain = mni
    field = shading(brain)
    assert field[brain].min() < 0.75 and field[brain].max() > 1.3  # about +-30 % over the brain
    shaded, corrected = n4_shaded
    assert corrected.shape == data.shape and corrected.dtype == np.float32 and np.isfinite(corrected).all()
    assert (corrected[~brain] == 0).all()  # the air (0 here) keeps its level
    before, after = log_ratio_std(shaded, data, brain), log_ratio_std(corrected, data, brain)
    assert after < before / 3, (before, after)
    assert correlation(shaded, data, brain) < 0.85
    # The anatomy is kept. Not > 0.99: N4 at 4 mm leaves a few per cent of smooth change, as it also
    # makes on the unshaded brain (next test); corrected and N4-of-unshaded agree to < 2 % (std of log ratio).
    assert correlation(corrected, data, brain) > 0.98
    corrected_unshaded = n4_correct(data, brain, (VOXEL_MM,) * 3)
    assert log_ratio_std(corrected, corrected_unshaded, brain) < before / 5
    assert correlation(corrected, corrected_unshaded, brain) > 0.99


def test_n4_changes_an_unshaded_brain_little(mni):
    from utils.bias_field import n4_correct
    data, brain = mni
    corrected = n4_correct(data, brain, (VOXEL_MM,) * 3)
    assert (corrected[~brain] == 0).all()
    assert log_ratio_std(corrected, data, brain) < 0.04
    assert correlation(corrected, data, brain) > 0.99
    tissue = brain & (data > np.percentile(data[brain], 60))  # white matter mostly: not made less uniform
    assert corrected[tissue].std() / corrected[tissue].mean() < 1.1 * data[tissue].std() / data[tissue].mean()


# A mask one voxel larger than a skull-stripped brain (14 % of its voxels 0) left most of the shading in when N4 was
# fitted on every mask voxel (std of the log ratio 0.144 -> 0.115, against 0.032 with the tight mask); nilearn's
# template also holds denormals (~1e-45) that a `data > 0` mask takes in, on which N4 stopped with a field of ~1e-6.
def test_n4_fits_the_brain_not_the_zeros_of_a_generous_mask(mni, n4_shaded):
    """A user's brain mask (--mask_dir) is often a little larger than the skull-stripped brain, whose air is 0:
    N4's log-intensity histogram must not take those zeros in."""
    from utils.bias_field import n4_correct
    data, brain = mni
    shaded, tight = n4_shaded
    generous = ndimage.binary_dilation(brain, iterations=1)
    assert 0.05 < 1 - brain[generous].mean() < 0.3  # the zeros the mask takes in
    loose = n4_correct(shaded, generous, (VOXEL_MM,) * 3)
    before = log_ratio_std(shaded, data, brain)
    assert log_ratio_std(loose, data, brain) < before / 3  # as with the tight mask (test above)


# ---- 2. the classifier separates the two demo vendors -------------------------------------------

def test_classifier_tells_the_demo_vendors_apart(demo_scans, demo_model):
    from utils.vendor_classifier import FEATURES, target_share
    features = demo_scans[VENDORS[0], HELD_OUT[0]][3]
    assert features.ndim == 2 and features.shape[1] == len(FEATURES) and len(features) > 30
    assert np.isfinite(features).all()
    for subject in HELD_OUT:
        target, source = (target_share(demo_model, demo_scans[vendor, subject][3]) for vendor in VENDORS[::-1])
        print(f'{stem(subject)}: vendor 2 {target:.3f}, vendor 1 {source:.3f}')
        assert target > 0.8, (subject, target)
        assert source < 0.2, (subject, source)
    assert np.isnan(target_share(demo_model, features[:0]))  # no patch: no share


# ---- 3. not fooled by an intensity curve ---------------------------------------------------------

def test_histogram_matching_to_vendor_2_is_not_called_vendor_2(demo_scans, demo_model):
    """The demo vendors differ in blur, noise and shading as well as contrast: matching vendor 1's histogram to
    the pooled vendor-2 intensities moves the intensity features only."""
    from utils.evaluation import match_to, unit_volume
    from utils.vendor_classifier import patch_features, target_share
    pooled = np.concatenate([demo_scans[VENDORS[1], s][2][demo_scans[VENDORS[1], s][1]] for s in TARGET_TRAIN])
    for subject in HELD_OUT:
        data, anatomy, _, _ = demo_scans[VENDORS[0], subject]
        matched = unit_volume(match_to(data, anatomy, pooled), 'matched', anatomy)
        # the curve did its job: the intensities are vendor 2's (vendor 1's median is far lower)
        assert abs(np.median(matched[anatomy]) - np.median(pooled)) < 0.02
        share = target_share(demo_model, patch_features(matched, anatomy))
        print(f'{stem(subject)} matched to vendor 2: {share:.3f}')
        assert share < 0.5, (subject, share)


def template_subject(base, subject):
    """(vendor A volume, brain) of a template 'subject': conftest.subject_volume, and a shift of one voxel along z
    per three subjects so that no two of the eight are the same."""
    a = 1000 * np.roll(subject_volume(base, subject), subject // 3 - 1, axis=2)
    return a.astype(np.float32), a > 0


def vendor_b(a, brain):
    """Vendor B: a blurred copy of vendor A (gaussian, sigma one voxel), same intensity scale, air 0."""
    return np.where(brain, ndimage.gaussian_filter(a, 1.0), 0).astype(np.float32)


def test_a_curve_of_the_sharp_vendor_is_not_called_the_blurred_one(mni):
    from utils.evaluation import match_to, unit_volume
    from utils.vendor_classifier import VendorClassifier, patch_features, target_share
    base = mni[0]
    volumes = {}
    for subject in range(8):
        a, brain = template_subject(base, subject)
        volumes[subject] = (a, vendor_b(a, brain), brain)
    features = {(vendor, s): patch_features(unit_volume(volumes[s][index], 'x', volumes[s][2]), volumes[s][2])
                for s in volumes for index, vendor in enumerate('AB')}
    model = VendorClassifier([(s, features['A', s]) for s in (0, 1, 2)],
                             [(s, features['B', s]) for s in (3, 4, 5)]).fit_without(None)
    pooled_b = np.concatenate([unit_volume(volumes[s][1], 'b', volumes[s][2])[volumes[s][2]] for s in (3, 4, 5)])
    for subject in (6, 7):
        a, b, brain = volumes[subject]
        unit_a = unit_volume(a, 'a', brain)
        assert target_share(model, features['B', subject]) > 0.8  # the classifier does see the blur
        assert target_share(model, features['A', subject]) < 0.2
        curves = {'gamma 1.5': np.where(brain, unit_a ** 1.5, 0), 'gamma 0.7': np.where(brain, unit_a ** 0.7, 0),
                  'matched to B': match_to(a, brain, pooled_b)}
        for name, curved in curves.items():
            share = target_share(model, patch_features(unit_volume(curved, name, brain), brain))
            print(f'template subject {subject}, A through {name}: {share:.3f}')
            assert share < 0.5, (subject, name, share)


# ---- 4. fit_without holds the subject apart ------------------------------------------------------

def coefficients(model):
    scaler, regression = model[0], model[-1]
    return np.concatenate([scaler.mean_, scaler.scale_, regression.coef_.ravel(), regression.intercept_])


def test_fit_without_leaves_the_subject_out(demo_scans):
    from utils.vendor_classifier import VendorClassifier
    source = [(stem(s), demo_scans[VENDORS[0], s][3]) for s in (1, 2, 3)]
    target = [(stem(s), demo_scans[VENDORS[1], s][3]) for s in (3, 4, 5)]  # subject 3 is in both lists
    held = VendorClassifier(source, target).fit_without(stem(3))
    without = VendorClassifier(source[:2], target[1:]).fit_without('nobody')
    np.testing.assert_array_equal(coefficients(held), coefficients(without))
    # and subject 3's scans would have changed the model: the comparison above can fail
    everything = VendorClassifier(source, target).fit_without('nobody')
    assert not np.allclose(coefficients(everything), coefficients(without))
    # another subject held apart: only that one goes
    np.testing.assert_array_equal(coefficients(VendorClassifier(source, target).fit_without(stem(5))),
                                  coefficients(VendorClassifier(source, target[:2]).fit_without('nobody')))


def test_fit_without_gives_none_where_a_vendor_has_no_scan_left(demo_scans):
    from utils.vendor_classifier import VendorClassifier, target_share
    features = demo_scans[VENDORS[0], 1][3]
    only_source = VendorClassifier([(stem(1), features)], [(stem(1), demo_scans[VENDORS[1], 1][3]),
                                                             (stem(2), demo_scans[VENDORS[1], 2][3])])
    assert only_source.fit_without(stem(1)) is None  # no vendor-1 scan but subject 1's
    assert only_source.fit_without(stem(2)) is not None
    only_target = VendorClassifier([(stem(1), features), (stem(2), demo_scans[VENDORS[0], 2][3])],
                                   [(stem(2), demo_scans[VENDORS[1], 2][3])])
    assert only_target.fit_without(stem(2)) is None
    assert VendorClassifier([], [(stem(1), features)]).fit_without('nobody') is None
    assert np.isnan(target_share(None, features))


# ---- 5. evaluate.py end to end -------------------------------------------------------------------

EVALUATED, MASKLESS, TARGETS = (5, 6, 7), 8, (1, 2, 3, 4)


@pytest.fixture(scope='module')
def study(demo, tmp_path_factory):
    """Subjects 5-8: their vendor-2 scans as the 'harmonized' outputs (a perfect harmonization) and as the
    references, their vendor-1 scans as the sources; vendor-2 scans of subjects 1-4 as the target vendor; the brain
    masks of every subject but 8 in one folder (evaluate.py finds masks by stem)."""
    root = tmp_path_factory.mktemp('study')
    folders = {name: root / name for name in ('harmonized', 'source', 'reference', 'target', 'masks')}
    for folder in folders.values():
        folder.mkdir()
    for subject in EVALUATED + (MASKLESS,):
        shutil.copy(scan_path(demo, VENDORS[1], subject), folders['harmonized'] / f'{stem(subject)}_harmonized.nii.gz')
        shutil.copy(scan_path(demo, VENDORS[0], subject), folders['source'] / f'{stem(subject)}.nii.gz')
        shutil.copy(scan_path(demo, VENDORS[1], subject), folders['reference'] / f'{stem(subject)}.nii.gz')
    for subject in TARGETS:
        shutil.copy(scan_path(demo, VENDORS[1], subject), folders['target'] / f'{stem(subject)}.nii.gz')
    for subject in EVALUATED + TARGETS:
        shutil.copy(mask_path(demo, VENDORS[1], subject), folders['masks'] / f'{stem(subject)}.nii.gz')
    return {name: str(folder) for name, folder in folders.items()}


@pytest.fixture(scope='module')
def evaluated(study, tmp_path_factory):
    """evaluate.main on the study once (it costs seconds per volume): (failed files, what it printed, metrics.csv)."""
    import contextlib
    import io
    import evaluate
    output = tmp_path_factory.mktemp('evaluated') / 'evaluation'
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        failed = evaluate.main(['--harmonized_dir', study['harmonized'], '--target_dir', study['target'],
                                '--source_dir', study['source'], '--reference_dir', study['reference'],
                                '--mask_dir', study['masks'], '--output_dir', str(output)])
    return failed, printed.getvalue(), pd.read_csv(output / 'metrics.csv')


def test_evaluate_reports_n4_nyul_and_the_vendor_classifier(evaluated):
    from utils.evaluation import HARMONIZED, METRICS, N4_NYUL, NYUL, TARGET_MATCHING, UNHARMONIZED
    _, _, table = evaluated
    assert list(table.columns) == ['volume', 'method', *METRICS]
    print(table.round(3).to_string())
    for subject in EVALUATED:
        rows = table[table['volume'] == stem(subject)].set_index('method')
        assert N4_NYUL in rows.index, rows.to_string()
        n4, nyul = rows.loc[N4_NYUL], rows.loc[NYUL]
        assert 0.5 < n4['SSIM'] < 1, rows.to_string()  # finite, and not the reference itself
        assert np.isfinite(n4[['vendor_distance', 'vendor_classifier', 'NMI', 'tissue_Dice', 'PSNR', 'MAE']]
                           .astype(float)).all(), rows.to_string()
        assert n4['SSIM'] != nyul['SSIM'] and n4['NMI'] != nyul['NMI']  # N4 did change the input
        # A real target-vendor scan passed as harmonized is the target vendor, the input is not; the intensity
        # baselines lie in between (N4 + Nyul also moves the shading features)
        assert rows.loc[HARMONIZED, 'vendor_classifier'] > 0.8, rows.to_string()
        assert rows.loc[UNHARMONIZED, 'vendor_classifier'] < 0.2, rows.to_string()
        for method in (NYUL, N4_NYUL, TARGET_MATCHING):
            assert rows.loc[method, 'vendor_classifier'] < rows.loc[HARMONIZED, 'vendor_classifier'] - 0.1, \
                rows.to_string()
    means = table[table['volume'] == 'mean'].set_index('method')
    assert means.loc[HARMONIZED, 'vendor_classifier'] > 0.9
    assert means.loc[UNHARMONIZED, 'vendor_classifier'] < 0.1
    assert np.isfinite(means.loc[N4_NYUL, 'SSIM'])


def test_evaluate_without_the_mask_of_one_subject_fails_that_one_only(study, evaluated):
    failed, out, table = evaluated
    bad = os.path.join(study['harmonized'], f'{stem(MASKLESS)}_harmonized.nii.gz')
    assert failed == [bad]
    failures = [line for line in out.splitlines() if line.startswith('failed:')]
    assert len(failures) == 1 and bad in failures[0] and f'{stem(MASKLESS)}.nii.gz' in failures[0], out
    assert 'Traceback' not in out
    assert set(table['volume']) == {stem(s) for s in EVALUATED} | {'mean'}
    assert f'1 failed: {bad}' in out


def test_evaluate_with_one_usable_target_scan_warns_and_runs(study, tmp_path, capsys):
    """A --target_dir of one readable scan and an all-zero one: the zero one is skipped and the warning says that
    everything is fitted on one scan."""
    import evaluate
    from utils.evaluation import N4_NYUL
    target = tmp_path / 'target'
    target.mkdir()
    shutil.copy(os.path.join(study['target'], f'{stem(TARGETS[0])}.nii.gz'), target)
    reference = nib.load(os.path.join(study['target'], f'{stem(TARGETS[0])}.nii.gz'))
    nib.save(nib.Nifti1Image(np.zeros(reference.shape, np.float32), reference.affine), str(target / 'empty.nii.gz'))
    harmonized = tmp_path / 'harmonized'
    harmonized.mkdir()
    for subject in EVALUATED[:2]:
        shutil.copy(os.path.join(study['harmonized'], f'{stem(subject)}_harmonized.nii.gz'), harmonized)
    capsys.readouterr()
    failed = evaluate.main(['--harmonized_dir', str(harmonized), '--target_dir', str(target),
                            '--source_dir', study['source'], '--output_dir', str(tmp_path / 'evaluation')])
    out = capsys.readouterr().out
    assert failed == []
    warnings = [line for line in out.splitlines() if line.startswith('warning:')]
    assert any('one usable scan' in line and str(target) in line for line in warnings), out
    assert any(line.startswith('skipped target scan') and 'empty.nii.gz' in line for line in out.splitlines()), out
    table = pd.read_csv(tmp_path / 'evaluation' / 'metrics.csv')
    rows = table[table['volume'] == stem(EVALUATED[0])].set_index('method')
    assert np.isfinite(rows.loc[N4_NYUL, 'vendor_distance'])
    assert np.isfinite(rows['vendor_classifier']).all()  # trained on one target scan and the other subject's source
