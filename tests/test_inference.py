"""Inference: inference_nii.py on one tiny experiment trained once (generate_paired_dataset.py -> train.py),
orientation and size round trips, output headers and scale, epoch selection, metrics, and bad input.

Expected outputs are recomputed here with nibabel, numpy and a plain forward pass of the saved generator
weights, not with the project's volume helpers.
"""
import gzip
import math
import os
import shutil
import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from skimage.metrics import structural_similarity

from conftest import philips, save_scan, siemens
from model.generator import Generator
from utils.errors import run_cli

import evaluate
import inference_nii

VENDORS = ('SIEMENS', 'Philips')
PERCENTILE = 99.5
EXPERIMENT = 'tiny'


# ---- volumes ------------------------------------------------------------------------------------

def canonical(path_or_image):
    image = nib.load(str(path_or_image)) if isinstance(path_or_image, (str, os.PathLike)) else path_or_image
    return nib.as_closest_canonical(image).get_fdata()


def normalised(data):
    return np.clip(data / np.percentile(data[data > 0], PERCENTILE), 0, 1)


def raw_header(path):
    opener = gzip.open if str(path).endswith('.gz') else open
    with opener(str(path), 'rb') as f:
        return nib.Nifti1Header.from_fileobj(f)


# ---- the experiment -----------------------------------------------------------------------------

@pytest.fixture
def experiment(tiny_experiment):
    """The session's small experiment (conftest.tiny_experiment): 6 subjects at 6 mm (vendor 2 int16, stored
    LPS / axial-first) -> dataset with 2 test subjects -> 2 epochs."""
    return tiny_experiment


TAGS = {'SIEMENS': 'S', 'Philips': 'P'}


def weights(experiment, src, trg, epoch):
    suffix = 'best' if epoch == 'best' else f'epoch_{epoch}'
    return os.path.join(experiment['dir'], 'model', f'netG_{TAGS[src]}_to_{TAGS[trg]}_{suffix}.pth')


def manual_harmonize(path, weights_path, scale, input_skip=False):
    """The whole recipe written out: canonical -> robust-max normalisation -> generator per axial slice ->
    background zero -> target scale -> the input's storage orientation."""
    image = nib.load(str(path))
    data = nib.as_closest_canonical(image).get_fdata().astype(np.float32)
    unit = normalised(data).astype(np.float32)
    generator = Generator(ngf=8, n_res_blocks=2, input_skip=input_skip)
    generator.load_state_dict(torch.load(weights_path, map_location='cpu', weights_only=True)['state_dict'])
    generator.eval()
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(unit, 2, 0)[:, None]))
        y = ((generator(x * 2 - 1) + 1) / 2).clamp(0, 1)[:, 0].numpy()
    out = np.moveaxis(y, 0, 2)
    out[data <= 0] = 0
    out = out * scale if scale is not None else out
    return apply_orientation(out, ornt_transform(axcodes2ornt('RAS'), io_orientation(image.affine)))


def harmonize(experiment, data_dir, save_dir, src='SIEMENS', trg='Philips', epoch='latest', **kwargs):
    failed = inference_nii.main(str(data_dir), str(save_dir), src_vendor=src, trg_vendor=trg, experiment=EXPERIMENT,
                                epoch=epoch, results_root=experiment['results'], device='cpu', **kwargs)
    return failed


def output_of(save_dir, stem):
    return os.path.join(str(save_dir), f'{stem}_harmonized.nii.gz')


def assert_matches_manual(output_path, input_path, weights_path, scale, input_skip=False):
    got = np.asarray(nib.load(output_path).dataobj, dtype=np.float32)
    want = manual_harmonize(input_path, weights_path, scale, input_skip)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-4 * (scale or 1))


# ---- orientation and size -----------------------------------------------------------------------

def test_orientation_round_trip_and_same_voxels_in_two_orientations(experiment, tmp_path):
    data, affine = siemens(3)
    inputs = tmp_path / 'in'
    inputs.mkdir()
    ras = save_scan(data, affine, inputs / 'vol_ras.nii.gz')
    ilp = save_scan(data, affine, inputs / 'vol_ilp.nii.gz', codes=('I', 'L', 'P'))  # axial axis first, flipped
    assert nib.load(ilp).shape == (data.shape[2], data.shape[0], data.shape[1])
    assert not harmonize(experiment, inputs, tmp_path / 'out')
    outputs = {}
    for path in (ras, ilp):
        stem = os.path.basename(path)[:-len('.nii.gz')]
        source, result = nib.load(path), nib.load(output_of(tmp_path / 'out', stem))
        assert result.shape == source.shape
        np.testing.assert_allclose(result.affine, source.affine, atol=1e-5)
        np.testing.assert_allclose(result.get_qform(), source.affine, atol=1e-5)
        np.testing.assert_allclose(result.get_sform(), source.affine, atol=1e-5)
        assert int(result.header['qform_code']) > 0 and int(result.header['sform_code']) > 0
        outputs[stem] = canonical(result)
    np.testing.assert_allclose(outputs['vol_ras'], outputs['vol_ilp'], rtol=1e-5,
                               atol=1e-4 * experiment['info']['intensity_scale']['Philips'])
    scale = experiment['info']['intensity_scale']['Philips']
    assert_matches_manual(output_of(tmp_path / 'out', 'vol_ilp'), ilp, weights(experiment, 'SIEMENS', 'Philips', 2),
                          scale)


def test_odd_in_plane_size(experiment, tmp_path):
    data, affine = siemens(1, resolution=4)
    cropped = data[5:42, 8:49, :]  # 37 x 41 in-plane
    shifted = affine.copy()
    shifted[:3, 3] += affine[:3, :3] @ np.array([5, 8, 0])
    inputs = tmp_path / 'in'
    inputs.mkdir()
    path = save_scan(cropped, shifted, inputs / 'odd.nii.gz', codes='LPS')
    assert not harmonize(experiment, inputs, tmp_path / 'out')
    result = nib.load(output_of(tmp_path / 'out', 'odd'))
    assert result.shape == nib.load(path).shape == (37, 41, 48)
    assert_matches_manual(output_of(tmp_path / 'out', 'odd'), path, weights(experiment, 'SIEMENS', 'Philips', 2),
                          experiment['info']['intensity_scale']['Philips'])


# ---- output files -------------------------------------------------------------------------------

@pytest.mark.parametrize('src, trg', [('SIEMENS', 'Philips'), ('Philips', 'SIEMENS')])
def test_output_header_values_and_scale(experiment, tmp_path, src, trg):
    data, affine = (siemens if src == 'SIEMENS' else philips)(2)
    inputs = tmp_path / 'in'
    inputs.mkdir()
    # Philips input is int16 with a scl_slope: the output must not inherit it
    path = save_scan(data, affine, inputs / 'subj_010.nii.gz', codes='LPS', int16=src == 'Philips')
    source = nib.load(path)
    assert harmonize(experiment, inputs, tmp_path / 'out', src=src, trg=trg) == []
    out_path = output_of(tmp_path / 'out', 'subj_010')
    header = raw_header(out_path)
    assert header.get_data_dtype() == np.float32
    slope, inter = float(header['scl_slope']), float(header['scl_inter'])
    assert math.isnan(slope) or slope in (0.0, 1.0), slope
    assert math.isnan(inter) or inter == 0.0, inter
    result = nib.load(out_path)
    assert result.dataobj.slope == 1 and result.dataobj.inter == 0
    values = np.asarray(result.dataobj)
    assert values.dtype == np.float32 and np.all(np.isfinite(values))
    input_values = np.asarray(source.dataobj, dtype=np.float32)
    assert np.all(values[input_values == 0] == 0)
    assert values.min() >= 0
    scale = experiment['info']['intensity_scale'][trg]
    assert scale > 100  # both vendors' scales are far from [0, 1] here
    assert 0.2 * scale < values.max() <= 1.0001 * scale
    assert_matches_manual(out_path, path, weights(experiment, src, trg, 2), scale)


def test_output_names_per_stem_and_nii_inputs(experiment, tmp_path):
    inputs = tmp_path / 'in'
    inputs.mkdir()
    save_scan(*siemens(0), inputs / 'subj_001.nii.gz')
    save_scan(*siemens(1), inputs / 'subj_002.nii', codes='LPS')
    save_scan(*siemens(2), inputs / 'sub-03_T1w.nii.gz')
    assert harmonize(experiment, inputs, tmp_path / 'out') == []
    written = sorted(f for f in os.listdir(tmp_path / 'out') if f.endswith(('.nii', '.nii.gz')))
    assert written == ['sub-03_T1w_harmonized.nii.gz', 'subj_001_harmonized.nii.gz', 'subj_002_harmonized.nii.gz']
    a = canonical(output_of(tmp_path / 'out', 'subj_001'))
    b = canonical(output_of(tmp_path / 'out', 'subj_002'))
    assert not np.allclose(a, b)  # two different subjects, two different outputs
    assert_matches_manual(output_of(tmp_path / 'out', 'subj_002'), inputs / 'subj_002.nii',
                          weights(experiment, 'SIEMENS', 'Philips', 2), experiment['info']['intensity_scale']['Philips'])


# ---- epochs and directions ----------------------------------------------------------------------

@pytest.fixture(scope='module')
def one_input(tmp_path_factory):
    folder = tmp_path_factory.mktemp('one_input')
    save_scan(*siemens(4), folder / 'subj_050.nii.gz', codes=('S', 'L', 'P'))
    save_scan(*philips(4), folder / 'subj_051.nii.gz', codes='LPS', int16=True)
    return folder


@pytest.mark.parametrize('epoch, expected', [('1', 1), ('latest', 2), ('best', 'best')])
def test_epoch_selection_loads_that_checkpoint(experiment, one_input, tmp_path, capsys, epoch, expected):
    assert harmonize(experiment, one_input, tmp_path / 'out', epoch=epoch) == []
    printed = capsys.readouterr().out
    line = next(l for l in printed.splitlines() if 'epoch' in l)
    if expected == 'best':
        best_epoch = experiment['best']['A2B']['epoch']
        assert 'best' in line and str(best_epoch) in line, line
        best = torch.load(weights(experiment, 'SIEMENS', 'Philips', 'best'), weights_only=True)['state_dict']
        same = torch.load(weights(experiment, 'SIEMENS', 'Philips', best_epoch), weights_only=True)['state_dict']
        assert all(torch.equal(best[k], same[k]) for k in best)
    else:
        assert f'epoch {expected}' in line, line
    assert_matches_manual(output_of(tmp_path / 'out', 'subj_050'), one_input / 'subj_050.nii.gz',
                          weights(experiment, 'SIEMENS', 'Philips', expected),
                          experiment['info']['intensity_scale']['Philips'])


def test_epochs_1_and_2_give_different_outputs(experiment, one_input, tmp_path):
    harmonize(experiment, one_input, tmp_path / 'e1', epoch=1)
    harmonize(experiment, one_input, tmp_path / 'e2', epoch=2)
    a = np.asarray(nib.load(output_of(tmp_path / 'e1', 'subj_050')).dataobj)
    b = np.asarray(nib.load(output_of(tmp_path / 'e2', 'subj_050')).dataobj)
    assert not np.allclose(a, b)


def test_experiment_trained_with_input_skip_is_harmonized_by_that_generator(experiment, tiny_experiment_input_skip,
                                                                           one_input, tmp_path):
    """arguments.txt says --input_skip, so inference builds the generator with the intensity maps."""
    results, name = os.path.split(tiny_experiment_input_skip)
    failed = inference_nii.main(str(one_input), str(tmp_path / 'out'), src_vendor='SIEMENS', trg_vendor='Philips',
                                experiment=name, epoch='latest', results_root=results, device='cpu')
    assert failed == []
    assert_matches_manual(output_of(tmp_path / 'out', 'subj_050'), one_input / 'subj_050.nii.gz',
                          os.path.join(tiny_experiment_input_skip, 'model', 'netG_S_to_P_epoch_1.pth'),
                          experiment['info']['intensity_scale']['Philips'], input_skip=True)


def test_other_direction_uses_the_other_generator(experiment, one_input, tmp_path):
    assert harmonize(experiment, one_input, tmp_path / 'out', src='Philips', trg='SIEMENS', epoch='latest') == []
    assert_matches_manual(output_of(tmp_path / 'out', 'subj_051'), one_input / 'subj_051.nii.gz',
                          weights(experiment, 'Philips', 'SIEMENS', 2), experiment['info']['intensity_scale']['SIEMENS'])


def run_inference_cli(capsys, *argv):
    """inference_nii.py's command line in this process (same path as `python inference_nii.py`)."""
    code = 0
    try:
        run_cli(inference_nii.cli, [str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def cli_args(experiment, input_dir, output_dir, *more):
    return ['--experiment', EXPERIMENT, '--save_dir', experiment['results'], '--input_dir', input_dir,
            '--output_dir', output_dir, '--device', 'cpu', '--epoch', 'latest', *more]


def assert_reported(code, out, err, *names, prefix=('error:',)):
    assert code not in (0, None), out + err
    assert 'Traceback' not in out + err
    lines = [l.strip() for l in (out + err).splitlines() if l.strip().startswith(prefix)]
    assert lines, f'no {prefix} line in: {out[-500:]} {err[-500:]}'
    for name in names:
        assert any(str(name) in l for l in lines), f'no {prefix} line names {name}: {lines}'


def test_missing_epoch_lists_saved_epochs(experiment, one_input, tmp_path, capsys):
    code, out, err = run_inference_cli(capsys, *cli_args(experiment, one_input, tmp_path / 'out', '--epoch', '7'))
    assert_reported(code, out, err, 'epoch_7')
    assert err.strip().splitlines()[-1].startswith('error:')
    assert '1, 2' in err
    assert not (tmp_path / 'out').exists() or not os.listdir(tmp_path / 'out')


@pytest.mark.parametrize('src, trg', [('GE', 'Philips'), ('SIEMENS', 'GE'), ('SIEMENS', 'SIEMENS')])
def test_vendors_not_trained_on_are_refused(experiment, one_input, tmp_path, capsys, src, trg):
    code, out, err = run_inference_cli(capsys, *cli_args(experiment, one_input, tmp_path / 'out',
                                                         '--src_vendor', src, '--trg_vendor', trg))
    assert_reported(code, out, err, 'SIEMENS', 'Philips', src if src != 'SIEMENS' else trg)
    assert not (tmp_path / 'out').exists() or not os.listdir(tmp_path / 'out')


# ---- the two ways of running it -----------------------------------------------------------------

def test_constants_at_the_top_of_the_script(experiment, one_input, tmp_path, monkeypatch):
    monkeypatch.setattr(inference_nii, 'target_experiment', EXPERIMENT)
    monkeypatch.setattr(inference_nii, 'save_root', experiment['results'])
    monkeypatch.setattr(inference_nii, 'best_epochs', {'SIEMENS_to_Philips': 1, 'Philips_to_SIEMENS': 'best'})
    assert inference_nii.main(str(one_input), str(tmp_path / 'out'), src_vendor='SIEMENS', trg_vendor='Philips') == []
    assert sorted(os.listdir(tmp_path / 'out')) == ['subj_050_harmonized.nii.gz', 'subj_051_harmonized.nii.gz']
    assert_matches_manual(output_of(tmp_path / 'out', 'subj_050'), one_input / 'subj_050.nii.gz',
                          weights(experiment, 'SIEMENS', 'Philips', 1),
                          experiment['info']['intensity_scale']['Philips'])


def masked_metrics(prediction, reference, mask):
    from utils.metrics import fine_detail  # its own values are tested in test_fine_detail_known_answers
    _, ssim_map = structural_similarity(reference, prediction, data_range=1.0, full=True)
    mse = np.mean((prediction[mask].astype(np.float64) - reference[mask]) ** 2)
    return {'SSIM': ssim_map[mask].mean(), 'PSNR': 10 * np.log10(1.0 / mse),
            'MAE': np.mean(np.abs(prediction[mask].astype(np.float64) - reference[mask])),
            'Detail': fine_detail(prediction, mask) / fine_detail(reference, mask)}


def test_command_line_with_reference_and_target_writes_the_rows_of_evaluate_py(experiment, tmp_path, capsys):
    test_dir = experiment['dataset'] / 'testset'
    target_dir = experiment['root'] / 'scans' / 'Philips'  # the target vendor's scans (here of every subject)
    out = tmp_path / 'out'
    code, stdout, stderr = run_inference_cli(capsys, *cli_args(experiment, test_dir / 'SIEMENS', out, '--reference_dir',
                                                               test_dir / 'Philips', '--target_dir', target_dir,
                                                               '--epoch', 'latest'))
    assert code in (0, None), stdout[-2000:] + stderr[-2000:]
    stems = sorted(name[:-len('.nii.gz')] for name in os.listdir(test_dir / 'SIEMENS'))
    assert len(stems) == 2
    table = pd.read_csv(out / 'metrics.csv', dtype={'volume': str})
    assert {'SSIM', 'PSNR', 'MAE', 'Detail', 'vendor_distance', 'NMI', 'tissue_Dice'} <= set(table.columns)
    methods = ['harmonized', 'unharmonized', 'Nyul', 'N4 + Nyul', 'histogram matching to target',
               'oracle: histogram matching to reference']
    assert list(table['method']) == methods * 3 and list(table['volume']) == [*stems[:1] * 6, *stems[1:] * 6,
                                                                               *['mean'] * 6]
    scale = experiment['info']['intensity_scale']['Philips']
    for stem in stems:
        rows = table[table['volume'] == stem].set_index('method')
        source = normalised(canonical(test_dir / 'SIEMENS' / f'{stem}.nii.gz'))
        reference = normalised(canonical(test_dir / 'Philips' / f'{stem}.nii.gz'))
        mask = (reference > 0) | (source > 0)
        # every method's volume is normalised as training normalises a scan, the output too
        harmonized = normalised(canonical(output_of(out, stem)))
        for method, volume in (('unharmonized', source), ('harmonized', harmonized)):
            want = masked_metrics(volume, reference, mask)
            for metric in ('SSIM', 'PSNR', 'MAE', 'Detail'):
                assert rows.loc[method, metric] == pytest.approx(want[metric], rel=1e-4, abs=1e-4), (stem, method,
                                                                                                     metric)
        # histogram matching onto the reference makes the unharmonized intensities closer to it
        assert rows.loc['oracle: histogram matching to reference', 'MAE'] < rows.loc['unharmonized', 'MAE']
        with open(out / 'previews' / f'{stem}.png', 'rb') as f:
            assert f.read(8) == b'\x89PNG\r\n\x1a\n'
        assert_matches_manual(output_of(out, stem), test_dir / 'SIEMENS' / f'{stem}.nii.gz',
                              weights(experiment, 'SIEMENS', 'Philips', 2), scale)
    # evaluate.py on the same outputs writes the same rows: one implementation
    assert evaluate.main(['--harmonized_dir', str(out), '--target_dir', str(target_dir), '--source_dir',
                          str(test_dir / 'SIEMENS'), '--reference_dir', str(test_dir / 'Philips')]) == []
    pd.testing.assert_frame_equal(pd.read_csv(out / 'evaluation' / 'metrics.csv', dtype={'volume': str}), table)


def test_reference_without_target_gives_the_reference_rows(experiment, one_input, tmp_path):
    reference = tmp_path / 'reference'
    reference.mkdir()
    save_scan(*philips(4), reference / 'subj_050.nii.gz', codes='LPS')
    assert harmonize(experiment, one_input, tmp_path / 'out', reference_dir=str(reference)) == []
    table = pd.read_csv(tmp_path / 'out' / 'metrics.csv')
    assert list(table['method']) == ['harmonized', 'unharmonized', 'oracle: histogram matching to reference'] * 2
    assert list(table['volume']) == ['subj_050'] * 3 + ['mean'] * 3
    assert 'vendor_distance' not in table.columns and table['SSIM'].between(0, 1).all()


def test_volume_metrics_against_skimage():
    from utils.metrics import volume_metrics
    a = normalised(philips(0)[0]).astype(np.float32)
    b = normalised(philips(1)[0]).astype(np.float32)
    c = normalised(siemens(1)[0]).astype(np.float32)
    mask = (a > 0) | (b > 0)
    for prediction in (b, c):
        got = volume_metrics(prediction, a, mask)
        want = masked_metrics(prediction, a, mask)
        for metric in ('SSIM', 'PSNR', 'MAE'):
            assert got[metric] == pytest.approx(want[metric], rel=1e-6), metric
    # the mask matters: all voxels give another SSIM and a higher PSNR (the background agrees)
    everywhere = volume_metrics(c, a, np.ones_like(mask))
    assert everywhere['PSNR'] > volume_metrics(c, a, mask)['PSNR']
    same = volume_metrics(a, a, mask)
    assert same['SSIM'] == pytest.approx(1.0) and same['PSNR'] == math.inf and same['MAE'] == 0


def test_experiment_without_dataset_info_leaves_outputs_in_unit_range(experiment, one_input, tmp_path, capsys):
    """An experiment trained on pickles made by other means (no dataset_info.json next to them)."""
    experiment_dir = shutil.copytree(experiment['dir'], tmp_path / 'results' / 'noinfo')
    os.remove(experiment_dir / 'dataset_info.json')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        failed = inference_nii.main(str(one_input), str(tmp_path / 'out'), src_vendor='SIEMENS', trg_vendor='Philips',
                                    experiment='noinfo', epoch='latest', results_root=str(tmp_path / 'results'),
                                    device='cpu')
    assert failed == []
    out, err = capsys.readouterr()
    messages = ' '.join(str(w.message) for w in caught) + out + err
    assert 'dataset_info' in messages and '[0, 1]' in messages
    values = np.asarray(nib.load(output_of(tmp_path / 'out', 'subj_050')).dataobj)
    assert values.dtype == np.float32 and 0 <= values.min() and 0.2 < values.max() <= 1
    assert_matches_manual(output_of(tmp_path / 'out', 'subj_050'), one_input / 'subj_050.nii.gz',
                          os.path.join(experiment_dir, 'model', 'netG_S_to_P_epoch_2.pth'), None)


# ---- bad input ----------------------------------------------------------------------------------

def test_missing_experiment(experiment, one_input, tmp_path, capsys):
    args = cli_args(experiment, one_input, tmp_path / 'out')
    args[1] = 'no_such_experiment'
    code, out, err = run_inference_cli(capsys, *args)
    assert_reported(code, out, err, 'no_such_experiment')
    assert not (tmp_path / 'out').exists() or not os.listdir(tmp_path / 'out')


def test_missing_input_folder_and_folder_without_nifti(experiment, tmp_path, capsys):
    code, out, err = run_inference_cli(capsys, *cli_args(experiment, tmp_path / 'nowhere', tmp_path / 'out'))
    assert_reported(code, out, err, 'nowhere')
    empty = tmp_path / 'no_nifti'
    empty.mkdir()
    (empty / 'notes.txt').write_text('not a scan')
    np.save(empty / 'volume.npy', np.zeros((4, 4, 4)))
    code, out, err = run_inference_cli(capsys, *cli_args(experiment, empty, tmp_path / 'out'))
    assert_reported(code, out, err, 'no_nifti')
    assert sorted(os.listdir(empty)) == ['notes.txt', 'volume.npy']


def test_missing_or_empty_target_dir(experiment, one_input, tmp_path, capsys):
    code, out, err = run_inference_cli(capsys, *cli_args(experiment, one_input, tmp_path / 'out', '--target_dir',
                                                         tmp_path / 'nowhere'))
    assert_reported(code, out, err, '--target_dir', 'nowhere')
    (tmp_path / 'empty').mkdir()
    code, out, err = run_inference_cli(capsys, *cli_args(experiment, one_input, tmp_path / 'out', '--target_dir',
                                                         tmp_path / 'empty'))
    assert_reported(code, out, err, '--target_dir', 'empty')
    assert not (tmp_path / 'out').exists()


def test_output_folder_equal_to_input_folder_is_refused(experiment, tmp_path, capsys):
    inputs = tmp_path / 'in'
    inputs.mkdir()
    path = save_scan(*siemens(0), inputs / 'subj_001.nii.gz')
    with open(path, 'rb') as f:
        before = f.read()
    code, out, err = run_inference_cli(capsys, *cli_args(experiment, inputs, inputs))
    assert_reported(code, out, err, 'in')
    assert os.listdir(inputs) == ['subj_001.nii.gz']
    with open(path, 'rb') as f:
        assert f.read() == before
    # the same folder spelled differently is the same folder
    code, out, err = run_inference_cli(capsys, *cli_args(experiment, inputs, f'{inputs}/./'))
    assert code not in (0, None) and os.listdir(inputs) == ['subj_001.nii.gz']


def test_bad_files_among_good_ones_are_reported_and_skipped(experiment, tmp_path, capsys):
    inputs = tmp_path / 'in'
    inputs.mkdir()
    data, affine = siemens(0)
    save_scan(data, affine, inputs / 'a_good.nii.gz')
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), affine), str(inputs / 'b_four_d.nii.gz'))
    with open(inputs / 'a_good.nii.gz', 'rb') as f:
        raw = f.read()
    (inputs / 'c_corrupt.nii.gz').write_bytes(raw[: len(raw) // 2])
    nib.save(nib.Nifti1Image(np.zeros_like(data), affine), str(inputs / 'd_empty.nii.gz'))
    save_scan(*siemens(1), inputs / 'e_good.nii', codes='LPS')
    code, out, err = run_inference_cli(capsys, *cli_args(experiment, inputs, tmp_path / 'out'))
    assert_reported(code, out, err, 'b_four_d.nii.gz', 'c_corrupt.nii.gz', 'd_empty.nii.gz',
                    prefix=('error:', 'failed:'))
    written = sorted(f for f in os.listdir(tmp_path / 'out') if 'harmonized' in f)
    assert written == ['a_good_harmonized.nii.gz', 'e_good_harmonized.nii.gz']
    for stem, name in (('a_good', 'a_good.nii.gz'), ('e_good', 'e_good.nii')):
        assert_matches_manual(output_of(tmp_path / 'out', stem), inputs / name,
                              weights(experiment, 'SIEMENS', 'Philips', 2),
                              experiment['info']['intensity_scale']['Philips'])
    assert (inputs / 'c_corrupt.nii.gz').read_bytes() == raw[: len(raw) // 2]


def test_existing_outputs_are_kept_unless_overwrite(experiment, tmp_path, capsys):
    inputs, out = tmp_path / 'in', tmp_path / 'out'
    inputs.mkdir()
    out.mkdir()
    path = save_scan(*siemens(0), inputs / 'subj_001.nii.gz')
    save_scan(*siemens(1), inputs / 'subj_002.nii.gz')
    existing = out / 'subj_001_harmonized.nii.gz'
    existing.write_bytes(b'an earlier result')
    code, stdout, stderr = run_inference_cli(capsys, *cli_args(experiment, inputs, out))
    assert code in (0, None), stdout + stderr
    assert existing.read_bytes() == b'an earlier result'
    assert '--overwrite' in stdout + stderr
    assert os.path.exists(output_of(out, 'subj_002'))
    code, stdout, stderr = run_inference_cli(capsys, *cli_args(experiment, inputs, out, '--overwrite'))
    assert code in (0, None), stdout + stderr
    assert_matches_manual(str(existing), path, weights(experiment, 'SIEMENS', 'Philips', 2),
                          experiment['info']['intensity_scale']['Philips'])


def test_fine_detail_known_answers():
    from scipy import ndimage
    from utils.metrics import fine_detail
    mask = np.zeros((40, 40, 40), dtype=bool)
    mask[5:35, 5:35, 5:35] = True
    noise = np.random.default_rng(0).normal(0, 0.1, mask.shape)
    # white noise keeps 1 - 2 k0 + sum(k^2) of its variance, k the blur's kernel (k0 its centre)
    delta = np.zeros((15, 15, 15))
    delta[7, 7, 7] = 1
    kernel = ndimage.gaussian_filter(delta, 1.0)
    expected = 0.1 * np.sqrt(1 - 2 * kernel[7, 7, 7] + (kernel ** 2).sum())
    assert fine_detail(noise, mask) == pytest.approx(expected, rel=0.02)
    assert fine_detail(np.full(mask.shape, 0.7), mask) == pytest.approx(0, abs=1e-12)
    assert fine_detail(3 * noise, mask) == pytest.approx(3 * fine_detail(noise, mask), rel=1e-9)
    # the 2 voxels inside the mask's edge are left out: noise there does not count
    edge = mask & ~ndimage.binary_erosion(mask, iterations=2)
    assert fine_detail(np.where(edge, noise, 0.0), mask) < 0.1 * fine_detail(noise, mask)
    # a real scan, blurred as an L1 model's average would be, keeps far less
    reference = normalised(philips(0, resolution=2)[0])
    head = reference > 0
    assert fine_detail(ndimage.gaussian_filter(reference, 1.5), head) < 0.6 * fine_detail(reference, head)
    assert math.isnan(fine_detail(reference, np.zeros_like(head)))
