"""evaluate.py and utils/evaluation.py on real MRI (the MNI152 T1 template at 4 mm, two "vendors" from
conftest.py): each figure's known answers, Nyul fitted on one folder and applied to another, volumes stored in
different axis orders, the CSV layout, and bad input. inference_nii.py --target_dir writing the same rows as
evaluate.py is tested in test_inference.py, on its trained experiment."""
import functools
import hashlib
import math
import os
import re

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nibabel.orientations import axcodes2ornt, ornt_transform
from scipy import ndimage

from conftest import mni_t1, second_vendor, subject_volume
from utils.errors import UserError, run_cli
from utils.evaluation import (HARMONIZED, METRICS, N4_NYUL, NYUL, ORACLE, TARGET_MATCHING, UNHARMONIZED, TargetVendor,
                              evaluate_volume, nyul_standardise, tissue_classes, tissue_fractions)

import evaluate

ALL_METHODS = [HARMONIZED, UNHARMONIZED, NYUL, N4_NYUL, TARGET_MATCHING, ORACLE]


@functools.lru_cache(maxsize=None)
def _template():
    image = mni_t1(4)
    return np.asarray(image.dataobj, dtype=np.float32), image.affine


def scan(subject, vendor):
    """(data, affine): a subject on the first vendor (values up to ~1000) or the second (gamma, blur, x4)."""
    base, affine = _template()
    data = subject_volume(base, subject)
    return (1000 * data if vendor == 'SIEMENS' else second_vendor(data, subject)), affine.copy()


def save(data, affine, path, codes='RAS'):
    image = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    if tuple(codes) != tuple('RAS'):
        image = image.as_reoriented(ornt_transform(axcodes2ornt('RAS'), axcodes2ornt(tuple(codes))))
    nib.save(image, str(path))
    return str(path)


def unit(data):
    return np.clip(data / np.percentile(data[data > 0], 99.5), 0, 1)


@pytest.fixture(scope='module')
def target_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp('target')
    for subject in range(3):
        save(*scan(subject, 'Philips'), folder / f'other_{subject}.nii.gz', codes=('RAS', 'LPS', 'SLP')[subject])
    return folder


@pytest.fixture(scope='module')
def target(target_dir):
    return TargetVendor(str(target_dir))


@pytest.fixture
def study(tmp_path):
    """Subjects 3 and 4: harmonized outputs (here their real second-vendor scans, named as inference names
    them), their first-vendor inputs and their second-vendor references."""
    folders = {name: tmp_path / name for name in ('harmonized', 'source', 'reference')}
    for folder in folders.values():
        folder.mkdir()
    for subject in (3, 4):
        stem = f'subj_00{subject}'
        save(*scan(subject, 'Philips'), folders['harmonized'] / f'{stem}_harmonized.nii.gz')
        save(*scan(subject, 'SIEMENS'), folders['source'] / f'{stem}.nii.gz')
        save(*scan(subject, 'Philips'), folders['reference'] / f'{stem}.nii.gz')
    return folders


def rows_of(path, target, source=None, reference=None):
    return {row['method']: row for row in evaluate_volume('v', str(path), target, source_path=source,
                                                          reference_path=reference)}


def snapshot(*folders):
    """Every file under the folders and a hash of its bytes."""
    found = {}
    for folder in folders:
        for root, _, names in os.walk(folder):
            for name in names:
                with open(os.path.join(root, name), 'rb') as f:
                    found[os.path.join(root, name)] = hashlib.sha256(f.read()).hexdigest()
    return found


# ---- each figure's known answers ----------------------------------------------------------------

def test_a_volume_against_itself(target, tmp_path):
    path = save(*scan(3, 'SIEMENS'), tmp_path / 'self.nii.gz')
    rows = rows_of(path, target, source=path, reference=path)
    same = rows[HARMONIZED]
    assert same['NMI'] == pytest.approx(2.0) and same['tissue_Dice'] == 1.0  # 2: identical (skimage's scale)
    assert same['SSIM'] == pytest.approx(1.0) and same['PSNR'] == math.inf and same['MAE'] == 0
    assert same['Detail'] == pytest.approx(1.0) and same['tissue_difference'] == 0
    assert same['vendor_distance'] == rows[UNHARMONIZED]['vendor_distance'] > 0.02
    assert sum(same[t] for t in ('CSF', 'GM', 'WM')) == pytest.approx(1.0)


def test_intensity_remapped_copy_keeps_the_anatomy_and_moves_the_vendor_distance(target, tmp_path):
    data, affine = scan(3, 'SIEMENS')
    source = save(data, affine, tmp_path / 'source.nii.gz')
    foreground = data > 0
    affine_copy = save(np.where(foreground, 300 + 0.7 * data, 0), affine, tmp_path / 'affine.nii.gz')
    gamma_copy = save(np.where(foreground, 1000 * unit(data) ** 1.5, 0), affine, tmp_path / 'gamma.nii.gz')
    rows = rows_of(affine_copy, target, source=source)
    remapped, unharmonized = rows[HARMONIZED], rows[UNHARMONIZED]
    # an affine map of the intensities is the same anatomy: every anatomy figure is exact
    assert remapped['NMI'] == pytest.approx(2.0) and remapped['tissue_Dice'] == 1.0
    assert remapped['vendor_distance'] > unharmonized['vendor_distance'] + 0.1
    # a curved map moves tissue boundaries of an intensity segmentation a little, the structure not at all
    curved = rows_of(gamma_copy, target, source=source)[HARMONIZED]
    assert curved['NMI'] > 1.8 and curved['tissue_Dice'] > 0.9
    assert curved['vendor_distance'] != pytest.approx(unharmonized['vendor_distance'], abs=1e-6)


@pytest.mark.parametrize('change', ['shift one voxel', 'shift two voxels', 'blur'])
def test_shifted_or_blurred_copy_loses_anatomy(target, tmp_path, change):
    data, affine = scan(3, 'SIEMENS')
    source = save(data, affine, tmp_path / 'source.nii.gz')
    changed = {'shift one voxel': np.roll(data, 1, axis=0), 'shift two voxels': np.roll(data, 2, axis=1),
               'blur': ndimage.gaussian_filter(data, 1.0) * (data > 0)}[change]
    row = rows_of(save(changed, affine, tmp_path / 'changed.nii.gz'), target, source=source, reference=source)
    kept = row[HARMONIZED]
    assert kept['NMI'] < 1.3 and kept['tissue_Dice'] < 0.85
    assert kept['SSIM'] < 0.9


def test_a_real_target_vendor_scan_scores_as_the_target(target, study):
    """The issue's check at test size: a real second-vendor scan passed as the output is best against its
    reference and near the target vendor; Nyul standardisation brings the input closer to the reference."""
    rows = rows_of(study['harmonized'] / 'subj_003_harmonized.nii.gz', target,
                   source=str(study['source'] / 'subj_003.nii.gz'),
                   reference=str(study['reference'] / 'subj_003.nii.gz'))
    assert list(rows) == ALL_METHODS
    real = rows[HARMONIZED]
    assert real['SSIM'] == pytest.approx(1.0) and real['tissue_difference'] == 0
    assert all(real['SSIM'] >= row['SSIM'] and real['tissue_difference'] <= row['tissue_difference']
               for row in rows.values())
    assert real['vendor_distance'] < 0.5 * rows[UNHARMONIZED]['vendor_distance']
    assert rows[NYUL]['vendor_distance'] < 0.5 * rows[UNHARMONIZED]['vendor_distance']
    # closer to the reference in intensity (on the demo data its SSIM is higher too: docs/evaluation.md)
    assert rows[NYUL]['MAE'] < rows[UNHARMONIZED]['MAE'] and rows[NYUL]['PSNR'] > rows[UNHARMONIZED]['PSNR']
    assert rows[TARGET_MATCHING]['vendor_distance'] < 1e-3  # matched to that very distribution
    assert rows[UNHARMONIZED]['NMI'] == pytest.approx(2.0)


def test_nyul_fitted_on_one_folder_maps_another_volumes_landmarks(target, target_dir, tmp_path):
    """Each landmark percentile of the new volume lands on the target's landmark (TorchIO's piecewise-linear map)."""
    assert len(target.paths) == 3 and all(str(target_dir) in path for path in target.paths)
    data, _ = scan(5, 'SIEMENS')
    mask = data > 0
    standardised = nyul_standardise(data, mask, target)
    assert np.all(standardised[~mask] == 0)
    landmarks = target.landmarks
    expected = target.range[0] + (landmarks - landmarks[0]) / (landmarks[-1] - landmarks[0]) * np.diff(target.range)
    for percentile, landmark in zip((1, 10, 50, 90, 99), expected[[0, 1, 6, 11, 12]]):
        assert np.percentile(standardised[mask], percentile) == pytest.approx(landmark, abs=0.01)
    # the target range is that of the target scans: their own 1st and 99th percentiles, averaged
    pooled = [unit(scan(subject, 'Philips')[0]) for subject in range(3)]
    low = np.mean([np.quantile(p[p > 0], 0.01) for p in pooled])
    assert target.range[0] == pytest.approx(low, abs=1e-3)
    # another folder gives other landmarks
    other = tmp_path / 'other_target'
    other.mkdir()
    for subject in range(2):
        save(*scan(subject, 'SIEMENS'), other / f's{subject}.nii.gz')
    assert not np.allclose(TargetVendor(str(other)).landmarks, landmarks, atol=1)


def test_tissue_classes_are_ordered_by_intensity_and_exact_on_three_tissues():
    data = unit(scan(3, 'SIEMENS')[0])
    mask = data > 0
    labels = tissue_classes(data, mask)
    means = [data[labels == tissue].mean() for tissue in (1, 2, 3)]
    assert means[0] < means[1] < means[2]  # CSF < GM < WM on T1
    assert np.all((labels > 0) == mask)
    piecewise = np.choose(labels, [0.0, 0.2, 0.55, 0.9])
    np.testing.assert_array_equal(tissue_classes(piecewise, mask), labels)
    assert 0.2 < tissue_fractions(labels)['WM'] < 0.6
    assert tissue_classes(np.where(mask, 0.5, 0.0), mask) is None
    assert all(math.isnan(v) for v in tissue_fractions(None).values())


def test_volumes_in_other_axis_orders_compare_voxel_to_voxel(target, tmp_path):
    data, affine = scan(3, 'Philips')
    source_data, _ = scan(3, 'SIEMENS')
    ras = rows_of(save(data, affine, tmp_path / 'h.nii.gz'), target,
                  source=save(source_data, affine, tmp_path / 's.nii.gz'),
                  reference=save(data, affine, tmp_path / 'r.nii.gz'))
    mixed = rows_of(save(data, affine, tmp_path / 'h_slp.nii.gz', codes='SLP'), target,
                    source=save(source_data, affine, tmp_path / 's_lps.nii.gz', codes='LPS'),
                    reference=save(data, affine, tmp_path / 'r_ilp.nii.gz', codes='ILP'))
    for method in ras:
        for metric in [m for m in METRICS if m in ras[method]]:
            assert mixed[method][metric] == pytest.approx(ras[method][metric], rel=1e-5, abs=1e-6), (method, metric)


def test_mask_dir_sets_the_foreground(study, target_dir, tmp_path):
    """A brain mask equal to the non-zero voxels changes nothing; a mask of one hemisphere changes the figures; a
    mask on another grid is that volume's error."""
    masks = tmp_path / 'masks'
    masks.mkdir()
    data, affine = scan(3, 'SIEMENS')
    save((data > 0).astype(np.float32), affine, masks / 'subj_003_mask.nii.gz', codes='LPS')
    half = (data > 0) & (np.arange(data.shape[0]) < data.shape[0] // 2)[:, None, None]
    save(half.astype(np.float32), affine, masks / 'subj_004.nii.gz')
    common = ['--harmonized_dir', str(study['harmonized']), '--target_dir', str(target_dir),
              '--source_dir', str(study['source'])]
    evaluate.main([*common, '--output_dir', str(tmp_path / 'plain')])
    # with --mask_dir every target scan needs its mask too (baselines fitted on mixed masks would mislead)
    with pytest.raises(UserError, match='other_0.nii.gz: no mask other_0'):
        evaluate.main([*common, '--mask_dir', str(masks), '--output_dir', str(tmp_path / 'masked')])
    assert not (tmp_path / 'masked').exists()
    for subject in range(3):
        other = nib.load(str(target_dir / f'other_{subject}.nii.gz'))
        nib.save(nib.Nifti1Image((np.asarray(other.dataobj) > 0).astype(np.uint8), other.affine),
                 str(masks / f'other_{subject}_mask.nii.gz'))
    evaluate.main([*common, '--mask_dir', str(masks), '--output_dir', str(tmp_path / 'masked')])
    plain, masked = (pd.read_csv(tmp_path / name / 'metrics.csv').set_index(['volume', 'method'])
                     for name in ('plain', 'masked'))
    # (the vendor classifier of subj_003 is trained on subj_004's source scan, whose mask changed: not compared)
    pd.testing.assert_frame_equal(masked.loc['subj_003'].drop(columns='vendor_classifier'),
                                  plain.loc['subj_003'].drop(columns='vendor_classifier'))
    assert not np.allclose(masked.loc['subj_004', 'vendor_distance'], plain.loc['subj_004', 'vendor_distance'])
    save(half[1:].astype(np.float32), affine, masks / 'subj_004.nii.gz')
    failed = evaluate.main([*common, '--mask_dir', str(masks), '--output_dir', str(tmp_path / 'bad')])
    assert [os.path.basename(path) for path in failed] == ['subj_004_harmonized.nii.gz']


# ---- the command line and the CSV ---------------------------------------------------------------

def test_csv_layout_means_figures_and_inputs_untouched(study, target_dir, capsys):
    before = snapshot(*study.values(), target_dir)
    failed = evaluate.main(['--harmonized_dir', str(study['harmonized']), '--target_dir', str(target_dir),
                            '--source_dir', str(study['source']), '--reference_dir', str(study['reference'])])
    assert failed == []
    output = study['harmonized'] / 'evaluation'
    table = pd.read_csv(output / 'metrics.csv', dtype={'volume': str})
    assert list(table.columns) == ['volume', 'method', *METRICS]
    n = len(ALL_METHODS)
    assert list(table['volume']) == ['subj_003'] * n + ['subj_004'] * n + ['mean'] * n
    assert list(table['method']) == ALL_METHODS * 3
    volumes = table[table['volume'] != 'mean'].replace([np.inf], np.nan)
    means = table[table['volume'] == 'mean'].set_index('method')
    for method in ALL_METHODS:
        for metric in ('vendor_distance', 'NMI', 'SSIM', 'tissue_difference'):
            want = volumes[volumes['method'] == method][metric].mean()
            assert means.loc[method, metric] == pytest.approx(want, rel=1e-5, abs=1e-6), (method, metric)
    for stem in ('subj_003', 'subj_004'):
        with open(output / 'previews' / f'{stem}.png', 'rb') as f:
            assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    printed = capsys.readouterr().out
    assert 'mean over volumes' in printed and ORACLE in printed and 's per volume' in printed
    after = snapshot(*study.values(), target_dir)
    assert {path: digest for path, digest in after.items() if str(output) not in path} == before


def test_harmonized_folder_alone_gives_vendor_distance_and_tissue_volumes(study, target_dir, tmp_path):
    assert evaluate.main(['--harmonized_dir', str(study['harmonized']), '--target_dir', str(target_dir),
                          '--output_dir', str(tmp_path / 'out')]) == []
    table = pd.read_csv(tmp_path / 'out' / 'metrics.csv')
    assert list(table.columns) == ['volume', 'method', 'vendor_distance', 'CSF', 'GM', 'WM']
    assert list(table['method']) == [HARMONIZED] * 3


def test_earlier_results_are_kept_unless_overwrite(study, target_dir, tmp_path):
    args = ['--harmonized_dir', str(study['harmonized']), '--target_dir', str(target_dir),
            '--output_dir', str(tmp_path / 'out')]
    evaluate.main(args)
    (tmp_path / 'out' / 'metrics.csv').write_text('an earlier result')
    with pytest.raises(UserError, match='--overwrite'):
        evaluate.main(args)
    assert (tmp_path / 'out' / 'metrics.csv').read_text() == 'an earlier result'
    evaluate.main([*args, '--overwrite'])
    assert (tmp_path / 'out' / 'metrics.csv').read_text().startswith('volume,method')


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize('flag', ['--harmonized_dir', '--target_dir', '--source_dir', '--reference_dir', '--mask_dir'])
def test_missing_folders(study, target_dir, tmp_path, flag):
    args = {'--harmonized_dir': study['harmonized'], '--target_dir': target_dir, '--source_dir': study['source']}
    args[flag] = tmp_path / 'nowhere'
    with pytest.raises(UserError, match=f'{flag} .*nowhere: no such folder'):
        evaluate.main([str(a) for pair in args.items() for a in pair])


@pytest.mark.parametrize('flag', ['--harmonized_dir', '--target_dir'])
def test_folders_without_volumes(study, target_dir, tmp_path, flag):
    empty = tmp_path / 'empty'
    empty.mkdir()
    (empty / 'notes.txt').write_text('not a scan')
    args = {'--harmonized_dir': study['harmonized'], '--target_dir': target_dir, flag: empty,
            '--output_dir': tmp_path / 'out'}
    with pytest.raises(UserError, match=f'{flag} .*empty: no .nii or .nii.gz files'):
        evaluate.main([str(a) for pair in args.items() for a in pair])
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('flag', ['--source_dir', '--reference_dir'])
def test_no_stem_in_common(study, target_dir, tmp_path, flag):
    others = tmp_path / 'others'
    others.mkdir()
    save(*scan(3, 'SIEMENS'), others / 'sub-99.nii.gz')
    with pytest.raises(UserError, match=f'{flag} .*others: no file stem in common'):
        evaluate.main(['--harmonized_dir', str(study['harmonized']), '--target_dir', str(target_dir), flag,
                       str(others)])


def test_one_bad_volume_is_reported_and_skipped(study, target_dir, tmp_path, capsys):
    """A reference on another grid, an all-zero output and a 4-D output: each named in one line and skipped; the
    good volume is evaluated; nothing of the inputs changes."""
    data, affine = scan(5, 'Philips')
    save(data[2:-2], affine, study['reference'] / 'subj_003.nii.gz')  # cropped: another grid
    save(np.zeros_like(data), affine, study['harmonized'] / 'subj_005_harmonized.nii.gz')
    save(data, affine, study['source'] / 'subj_005.nii.gz')
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), affine), str(study['harmonized'] / 'subj_006.nii.gz'))
    before = snapshot(*study.values(), target_dir)
    failed = evaluate.main(['--harmonized_dir', str(study['harmonized']), '--target_dir', str(target_dir),
                            '--source_dir', str(study['source']), '--reference_dir', str(study['reference']),
                            '--output_dir', str(tmp_path / 'out')])
    assert sorted(os.path.basename(path) for path in failed) == ['subj_003_harmonized.nii.gz',
                                                                  'subj_005_harmonized.nii.gz', 'subj_006.nii.gz']
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith('failed:')]
    assert len(lines) == 3 and 'Traceback' not in out
    assert any('subj_003.nii.gz' in line and 'grid' in line and 'resample' in line for line in lines)
    assert any('subj_005_harmonized.nii.gz' in line and 'all-zero' in line for line in lines)
    assert any('subj_006.nii.gz' in line and '4-D' in line for line in lines)
    table = pd.read_csv(tmp_path / 'out' / 'metrics.csv')
    assert set(table['volume']) == {'subj_004', 'mean'}
    assert snapshot(*study.values(), target_dir) == before


def test_all_zero_volume_alone_and_the_command_line_exit(study, target_dir, tmp_path, capsys):
    lone = tmp_path / 'lone'
    lone.mkdir()
    data, affine = scan(3, 'Philips')
    save(np.zeros_like(data), affine, lone / 'subj_003.nii.gz')
    code = 0
    try:
        run_cli(evaluate.cli, ['--harmonized_dir', str(lone), '--target_dir', str(target_dir)])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    assert code not in (0, None) and 'Traceback' not in out + err
    assert 'subj_003.nii.gz: no positive voxels' in out
    assert re.split(r'[\r\n]', err.strip())[-1].startswith('error:')  # the last line, after tqdm's bar
    assert os.listdir(lone) == ['subj_003.nii.gz']
