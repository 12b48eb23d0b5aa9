"""A battery of bad inputs fed to the three scripts: train.py, dataset/generate_paired_dataset.py, inference_nii.py.

For every case the script must end on the project's one error path: a one-line message naming the file or
flag (the last stderr line starts with 'error:', or for one volume of a folder a 'failed:'/'skipped:' line),
exit code 2 for bad usage or data and 1 for a failure while working, no traceback, and every input and
earlier result byte for byte unchanged. Malicious pickles and checkpoints are refused without running their
payload, and a killed inference leaves no output that looks complete but is not.

Most cases run the scripts in this process (runpy with the script's own `__main__` block, stdout/stderr
captured, SystemExit turned into the exit code): a fresh `python` costs ~3 s of torch import each, which
over a hundred cases would take minutes. A few tests start real processes to check the same path end to end.
"""
import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import (REPO, TINY_TRAIN_FLAGS, Result, mni_t1, run_script, second_vendor, subject_volume,
                      write_pickle_dataset)

TRAIN = 'train.py'
GENERATE = 'dataset/generate_paired_dataset.py'
INFER = 'inference_nii.py'
SHORT = {TRAIN: 'train', GENERATE: 'generate', INFER: 'inference'}
VENDORS = ('SIEMENS', 'Philips')


# ---- running the scripts ------------------------------------------------------------------------

def run_process(script, argv, cwd, timeout=300):
    """The script in a real Python process."""
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    done = subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return Result(done.returncode, done.stdout, done.stderr)


def lines(text):
    """Non-empty lines; progress-bar redraws ('\\r') count as line ends."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def last_line(text):
    found = lines(text)
    return found[-1] if found else ''


def balanced(line):
    """A message cut by a newline inside '(...)' (e.g. a wrapped library error) leaves an open parenthesis.

    Brackets count with parentheses, so an interval such as '[0, 1)' is balanced."""
    return line.count('(') + line.count('[') == line.count(')') + line.count(']')


def show(result):
    return f'exit code {result.code}\n--- stdout ---\n{result.out[-3000:]}\n--- stderr ---\n{result.err[-3000:]}'


def check_user_error(result, code, names=(), prefix='error:'):
    """The one error path: exit code, no traceback, and a one-line message naming every one of `names`.

    prefix 'error:' is the last line of stderr; 'failed:'/'skipped:' is a line about one volume (stdout)
    that names names[0].
    """
    assert 'Traceback' not in result.err + result.out, show(result)
    expected = code if isinstance(code, tuple) else (code,)
    assert result.code in expected, show(result)
    if prefix == 'error:':
        line = last_line(result.err)
        assert line.startswith('error:'), show(result)
    else:
        candidates = [line for line in lines(result.out + '\n' + result.err)
                      if line.startswith(prefix) and str(names[0]) in line]
        assert candidates, f'no {prefix!r} line naming {names[0]}\n' + show(result)
        line = candidates[0]
    for name in names:
        assert str(name) in line, f'{name} not named in: {line}\n' + show(result)
    assert balanced(line), f'the message runs over several lines: {line}\n' + show(result)
    return line


def tree(*folders):
    """{path: sha256 (or 'dir')} of everything under the folders."""
    found = {}
    for folder in map(str, folders):
        if os.path.isfile(folder):
            with open(folder, 'rb') as f:
                found[folder] = hashlib.sha256(f.read()).hexdigest()
            continue
        for root, dirs, files in os.walk(folder):
            for name in dirs:
                found[os.path.join(root, name)] = 'dir'
            for name in files:
                path = os.path.join(root, name)
                with open(path, 'rb') as f:
                    found[path] = hashlib.sha256(f.read()).hexdigest()
    return found


# ---- data ---------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def template():
    """The 6 mm MNI T1 (34 x 40 x 33) and its affine."""
    image = mni_t1(resolution=6)
    return np.asarray(image.dataobj, dtype=np.float32), image.affine


def nifti_bytes(data, affine, gz=True, edit=None, version=1):
    """A NIfTI-1 (or -2) file's bytes; `edit(header)` changes the header as stored, bypassing nibabel's checks."""
    image_class, header_class = ((nib.Nifti1Image, nib.Nifti1Header) if version == 1
                                 else (nib.Nifti2Image, nib.Nifti2Header))
    raw = image_class(data, affine).to_bytes()
    if edit is not None:
        header = header_class.from_fileobj(io.BytesIO(raw))
        edit(header)
        raw = header.binaryblock + raw[header_class.sizeof_hdr:]
    return gzip.compress(raw, compresslevel=1) if gz else raw  # level 9 costs a tenth of a second a volume


def save_nifti(path, data, affine):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(nifti_bytes(np.asarray(data, dtype=np.float32), affine))


def _set(field, index, value):
    def edit(header):
        header[field][index] = value
    return edit


def _singular(header):
    for row in ('srow_x', 'srow_y', 'srow_z'):
        header[row][:] = 0


def _corrupt_gzip(data, affine):
    good = bytearray(nifti_bytes(data, affine))
    middle = len(good) // 2
    good[middle:middle + 64] = bytes(64)  # a run of zeros in the deflate stream
    return '.nii.gz', bytes(good)


def _rgb(data, affine):
    rgb = np.zeros(data.shape, dtype=[('R', 'u1'), ('G', 'u1'), ('B', 'u1')])
    rgb['R'] = rgb['G'] = rgb['B'] = np.clip(data / data.max() * 255, 0, 255).astype(np.uint8)
    return '.nii.gz', gzip.compress(nib.Nifti1Image(rgb, affine).to_bytes(), compresslevel=1)


def _with_nonfinite(value):
    def build(data, affine):
        data = data.copy()
        data[data > np.percentile(data, 90)] = value
        return '.nii.gz', nifti_bytes(data, affine)
    return build


# name -> (build(data, affine) -> (suffix, bytes), expectation, scripts)
# expectation: 'refused' (an error naming the file), 'cleaned' (accepted with a warning naming the file),
# 'either' (refused, or accepted with a sane result)
BAD_VOLUMES = {
    'truncated_gzip': (lambda d, a: ('.nii.gz', nifti_bytes(d, a)[:len(nifti_bytes(d, a)) // 2]), 'refused'),
    'corrupt_gzip_stream': (_corrupt_gzip, 'refused'),
    'not_gzip_at_all': (lambda d, a: ('.nii.gz', b'this is not a NIfTI file\n' * 40), 'refused'),
    'empty_file': (lambda d, a: ('.nii.gz', b''), 'refused'),
    'truncated_uncompressed_nii': (lambda d, a: ('.nii', nifti_bytes(d, a, gz=False)[:5000]), 'refused'),
    'data_offset_past_end': (lambda d, a: ('.nii.gz', nifti_bytes(d, a, edit=_set('vox_offset', (), 1e9))),
                             'refused'),
    'four_d_series': (lambda d, a: ('.nii.gz', nifti_bytes(np.stack([d, d], -1), a)), 'refused'),
    'two_d_image': (lambda d, a: ('.nii.gz', nifti_bytes(d[:, :, 16], a)), 'refused'),
    'zero_size_dimension': (lambda d, a: ('.nii.gz', nifti_bytes(d, a, edit=_set('dim', 1, 0))), 'refused'),
    'negative_dimension': (lambda d, a: ('.nii.gz', nifti_bytes(d, a, edit=_set('dim', 1, -5))), 'refused'),
    'huge_dimensions_tiny_file': (lambda d, a: ('.nii.gz', nifti_bytes(d, a, edit=_set('dim', slice(1, 4), 32767))),
                                  'refused'),
    'huge_dimensions_nifti2': (lambda d, a: ('.nii.gz', nifti_bytes(d, a, version=2,
                                                                    edit=_set('dim', slice(1, 4), 100000))),
                               'refused'),
    'nan_voxel_size': (lambda d, a: ('.nii.gz', nifti_bytes(d, a, edit=_set('pixdim', slice(1, 4), np.nan))),
                       'refused'),
    'inf_voxel_size': (lambda d, a: ('.nii.gz', nifti_bytes(d, a, edit=_set('pixdim', 2, np.inf))), 'refused'),
    'zero_voxel_size': (lambda d, a: ('.nii.gz', nifti_bytes(d, a, edit=_set('pixdim', slice(1, 4), 0))), 'either'),
    'singular_affine': (lambda d, a: ('.nii.gz', nifti_bytes(d, a, edit=_singular)), 'refused'),
    'nan_affine': (lambda d, a: ('.nii.gz', nifti_bytes(d, a, edit=_set('srow_x', 0, np.nan))), 'refused'),
    'unknown_datatype_code': (lambda d, a: ('.nii.gz', nifti_bytes(d, a, edit=_set('datatype', (), 1234))), 'refused'),
    'complex64_data': (lambda d, a: ('.nii.gz', nifti_bytes((d + 1j * d[::-1]).astype(np.complex64), a)), 'refused'),
    'rgb24_data': (_rgb, 'refused'),
    'all_zero_volume': (lambda d, a: ('.nii.gz', nifti_bytes(np.zeros_like(d), a)), 'refused'),
    'nan_voxels': (_with_nonfinite(np.nan), 'cleaned'),
    'inf_voxels': (_with_nonfinite(np.inf), 'cleaned'),
    'four_d_single_volume': (lambda d, a: ('.nii.gz', nifti_bytes(d[..., None], a)), 'either'),
}
# inference only: generation accepts any in-plane size (train.py then refuses slices under 8 x 8)
BAD_VOLUMES_INFERENCE_ONLY = {
    'tiny_in_plane_3x3': (lambda d, a: ('.nii.gz', nifti_bytes(d[15:18, 18:21, :], a)), 'refused'),
}


def write_bad_volume(folder, stem, kind, template):
    build, expectation = {**BAD_VOLUMES, **BAD_VOLUMES_INFERENCE_ONLY}[kind]
    suffix, raw = build(*template)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, stem + suffix)
    with open(path, 'wb') as f:
        f.write(raw)
    return path, expectation


def vendor_folders(root, template, subjects=2):
    """SIEMENS/ and Philips/ folders of NIfTI pairs subj_001.. (the template and its second-vendor view)."""
    data, affine = template
    folders = (os.path.join(root, VENDORS[0]), os.path.join(root, VENDORS[1]))
    for index in range(subjects):
        a = subject_volume(data, index)
        save_nifti(os.path.join(folders[0], f'subj_{index + 1:03d}.nii.gz'), a, affine)
        save_nifti(os.path.join(folders[1], f'subj_{index + 1:03d}.nii.gz'), second_vendor(a, index), affine)
    return folders


def earlier_dataset(root):
    """An existing dataset in --output_dir: a failed run with --overwrite must leave it as it is."""
    folder = os.path.join(root, 'trainset', 'old_subject')
    os.makedirs(folder)
    with open(os.path.join(folder, 'slice_000.pkl'), 'wb') as f:
        pickle.dump({v: np.full((8, 8, 1), 0.5, np.float32) for v in VENDORS}, f)
    with open(os.path.join(root, 'dataset_info.json'), 'w') as f:
        json.dump({'vendors': list(VENDORS), 'note': 'an earlier dataset'}, f)
    return str(root)


@pytest.fixture(scope='module')
def small_pickles(tmp_path_factory):
    """1 train + 1 eval subject of 6 mm slices (34 x 40, 33 slices) in the seed's pickle layout."""
    return write_pickle_dataset(tmp_path_factory.mktemp('small_pickles') / 'data', subjects=(1, 1), resolution=6)


BAD_SLICE = os.path.join('trainset', 'subj_001', 'slice_016.pkl')  # inside --lower_bound 0.4 --upper_bound 0.6
PICKLE_BOUNDS = ['--lower_bound', '0.4', '--upper_bound', '0.6']


@pytest.fixture
def experiment(tiny_experiment):
    """The session's small trained experiment (conftest.tiny_experiment); path of its folder."""
    return tiny_experiment['root'] / 'results' / tiny_experiment['name']


def infer_args(experiment_dir, input_dir, output_dir, *extra):
    return ['--experiment', os.path.basename(str(experiment_dir)), '--save_dir', os.path.dirname(str(experiment_dir)),
            '--epoch', 'latest', '--src_vendor', 'SIEMENS', '--trg_vendor', 'Philips', '--input_dir', input_dir,
            '--output_dir', output_dir, '--device', 'cpu', '--batch_size', '8', *extra]


def inference_folders(tmp, template):
    """in/ with one good volume (b_good.nii.gz); out/ holding earlier results that must survive."""
    data, affine = template
    input_dir, output_dir = os.path.join(tmp, 'in'), os.path.join(tmp, 'out')
    save_nifti(os.path.join(input_dir, 'b_good.nii.gz'), data, affine)
    save_nifti(os.path.join(output_dir, 'earlier_harmonized.nii.gz'), data * 2, affine)
    with open(os.path.join(output_dir, 'notes.txt'), 'w') as f:
        f.write('earlier results\n')
    return input_dir, output_dir


def check_complete_output(path, shape):
    image = nib.load(path)
    data = image.get_fdata()
    assert data.shape == shape
    assert np.all(np.isfinite(data))
    zooms = np.asarray(image.header.get_zooms()[:3], dtype=float)
    assert np.all(np.isfinite(zooms)) and np.all(zooms > 0), zooms
    return data


# ---- 1. bad volumes: dataset generation and inference -------------------------------------------

VOLUME_CASES = [(script, kind) for script in (GENERATE, INFER) for kind in BAD_VOLUMES]
VOLUME_CASES += [(INFER, kind) for kind in BAD_VOLUMES_INFERENCE_ONLY]


@pytest.mark.parametrize('script,kind', VOLUME_CASES, ids=[f'{SHORT[s]}-{k}' for s, k in VOLUME_CASES])
def test_bad_volume(script, kind, template, tmp_path, request):
    if script == GENERATE:
        check_bad_volume_generation(kind, template, tmp_path)
    else:
        check_bad_volume_inference(kind, template, tmp_path, request.getfixturevalue('experiment'))


def check_bad_volume_generation(kind, template, tmp_path):
    """The bad file is vendor 1's subj_001. Refused: with it the only pair, generation ends with exit 2 and a
    'skipped:' line naming it, and an earlier dataset in --output_dir survives --overwrite. Cleaned/either:
    with two more good pairs, the dataset is written from finite data."""
    expectation = BAD_VOLUMES[kind][1]
    v1, v2 = vendor_folders(tmp_path, template, subjects=1 if expectation == 'refused' else 3)
    os.remove(os.path.join(v1, 'subj_001.nii.gz'))
    bad, _ = write_bad_volume(v1, 'subj_001', kind, template)
    output = earlier_dataset(tmp_path / 'dataset')
    before = tree(v1, v2, output)
    result = run_script(GENERATE, ['--vendor1_dir', v1, '--vendor2_dir', v2, '--output_dir', output, '--overwrite'],
                        cwd=tmp_path)
    if expectation == 'refused':
        check_user_error(result, 2, [bad], prefix='skipped:')
        assert last_line(result.err).startswith('error:'), show(result)
        assert tree(v1, v2, output) == before
        return
    if expectation == 'either' and result.code != 0:  # refused for the whole run: its voxel size is unlike the others'
        check_user_error(result, 2, [bad, '--voxel_size'])
        assert tree(v1, v2, output) == before
        return
    assert 'Traceback' not in result.out + result.err, show(result)
    assert result.code == 0, show(result)
    assert tree(v1, v2) == {k: v for k, v in before.items() if not k.startswith(output)}
    with open(os.path.join(output, 'dataset_info.json')) as f:
        info = json.load(f)
    used = sum(info['subjects'].values(), [])
    if expectation == 'cleaned':
        assert 'subj_001' in used, info
        warnings_ = [line for line in lines(result.out + result.err) if line.startswith('warning:') and bad in line]
        assert warnings_, show(result)
    elif 'subj_001' not in used:  # either: refused, then named
        check_user_error(result, 0, [bad], prefix='skipped:')
    for root, _, files in os.walk(output):
        for name in files:
            if name.endswith('.pkl'):
                with open(os.path.join(root, name), 'rb') as f:
                    sample = pickle.load(f)
                assert all(np.all(np.isfinite(v)) and v.min() >= 0 and v.max() <= 1 for v in sample.values())


def check_bad_volume_inference(kind, template, tmp_path, experiment):
    """The bad file (a_bad...) sorts before a good volume: the bad one is reported and skipped, the good one
    is written, the exit code is 1; earlier results in the output folder survive."""
    input_dir, output_dir = inference_folders(tmp_path, template)
    bad, expectation = write_bad_volume(input_dir, 'a_bad', kind, template)
    before_inputs, before_outputs = tree(input_dir, experiment), tree(output_dir)
    result = run_script(INFER, infer_args(experiment, input_dir, output_dir), cwd=tmp_path)
    assert 'Traceback' not in result.out + result.err, show(result)
    bad_output = os.path.join(output_dir, 'a_bad_harmonized.nii.gz')
    if expectation == 'refused' or (expectation == 'either' and result.code == 1):
        check_user_error(result, 1, [bad], prefix='failed:')
        assert not os.path.exists(bad_output)
    else:
        assert result.code == 0, show(result)
        check_complete_output(bad_output, template[0].shape)
        if expectation == 'cleaned':
            assert [line for line in lines(result.out + result.err) if line.startswith('warning:') and bad in line], \
                show(result)
    check_complete_output(os.path.join(output_dir, 'b_good_harmonized.nii.gz'), template[0].shape)
    assert tree(input_dir, experiment) == before_inputs
    after = tree(output_dir)
    assert {k: after.get(k) for k in before_outputs} == before_outputs
    assert not [name for name in os.listdir(output_dir) if name.startswith('.')], os.listdir(output_dir)


# ---- 2. bad flags, folders, pickles, checkpoints: one table of cases ----------------------------

class Case:
    """What one case set up: argv, what the message must name, which folders must not change."""

    def __init__(self, tmp, template, request):
        self.tmp, self.template, self.request = str(tmp), template, request
        self.unchanged = []      # every file and folder under these stays exactly as it was
        self.kept = []           # files under these stay as they were (new files allowed)
        self.absent = []         # paths that must not exist afterwards
        self.names = []          # what the message must name
        self.prefix = 'error:'
        self.after = None        # an extra check on the result

    def path(self, *parts):
        return os.path.join(self.tmp, *parts)

    @property
    def experiment(self):
        return self.request.getfixturevalue('experiment')

    # train.py -------------------------------------------------------------------------------------
    def train(self, *flags, data_root=None, ex='new', tiny=True):
        """train.py argv over a copy of the small pickle dataset; save_dir holds an earlier experiment."""
        if data_root is None:
            data_root = self.path('data')
            shutil.copytree(self.request.getfixturevalue('small_pickles'), data_root)
        save_dir = self.path('results')
        if not os.path.exists(save_dir):
            os.makedirs(os.path.join(save_dir, 'earlier', 'model'))
            with open(os.path.join(save_dir, 'earlier', 'arguments.txt'), 'w') as f:
                f.write('{}\n')
        self.unchanged += [data_root, save_dir]
        if not os.path.exists(os.path.join(save_dir, ex)):
            self.absent.append(os.path.join(save_dir, ex))  # a failed run leaves no half-made experiment
        base = ['-ex', ex, '--data_root', data_root, '--save_dir', save_dir, '--device', 'cpu', '--num_workers', '0']
        if tiny:
            base += ['--ngf', '8', '--n_res_blocks', '2', '--ndf', '8', *PICKLE_BOUNDS]
        return base + list(flags)

    def bad_slice(self, obj=None, raw=None):
        """train.py argv with trainset/subj_001/slice_016.pkl replaced by `obj` (pickled) or `raw` bytes."""
        argv = self.train()
        path = self.path('data', BAD_SLICE)
        with open(path, 'wb') as f:
            f.write(raw if raw is not None else pickle.dumps(obj))
        self.names.append(path)
        return argv

    def copy_experiment(self):
        """A copy of the trained experiment under tmp/results/exp (to be spoiled by the case)."""
        target = self.path('results', 'exp')
        shutil.copytree(str(self.experiment), target)
        return target

    # generate_paired_dataset.py -------------------------------------------------------------------
    def generate(self, *flags, subjects=2, overwrite=True):
        v1, v2 = vendor_folders(self.tmp, self.template, subjects)
        output = earlier_dataset(self.path('dataset'))
        self.unchanged += [v1, v2, output]
        return ['--vendor1_dir', v1, '--vendor2_dir', v2, '--output_dir', output,
                *(['--overwrite'] if overwrite else []), *flags]

    # inference_nii.py -----------------------------------------------------------------------------
    def infer(self, *flags, experiment_dir=None, input_dir=None, output_dir=None):
        experiment_dir = experiment_dir or str(self.experiment)
        default_in, default_out = inference_folders(self.tmp, self.template)
        input_dir, output_dir = input_dir or default_in, output_dir or default_out
        self.unchanged += [default_in, experiment_dir]
        self.kept.append(default_out)
        self.absent.append(os.path.join(default_out, 'b_good_harmonized.nii.gz'))
        return infer_args(experiment_dir, input_dir, output_dir, *flags)


CASES = {}


def case(script, code):
    """Register a case: fn(c) sets up files and returns argv; the script must exit with `code`."""
    def register(fn):
        CASES[f'{SHORT[script]}-{fn.__name__}'] = (script, code, fn)
        return fn
    return register


def tensor(shape=(34, 40, 1), value=0.5):
    return np.full(shape, value, np.float32)


# train.py: flags
@case(TRAIN, 2)
def negative_batch_size(c):
    c.names.append('--batch_size')
    return c.train('--batch_size', '-4')


@case(TRAIN, 2)
def zero_batch_size(c):
    c.names.append('--batch_size')
    return c.train('--batch_size', '0')


@case(TRAIN, 2)
def lower_bound_above_upper_bound(c):
    c.names += ['--lower_bound', '--upper_bound']
    return c.train('--lower_bound', '0.8', '--upper_bound', '0.2')


@case(TRAIN, 2)
def upper_bound_above_one(c):
    c.names.append('--upper_bound')
    return c.train('--upper_bound', '1.5')


@case(TRAIN, 2)
def total_epoch_not_above_decay_epoch(c):
    c.names += ['--total_epoch', '--decay_epoch']
    return c.train('--total_epoch', '4', '--decay_epoch', '4')


@case(TRAIN, 2)
def total_epoch_zero(c):
    c.names.append('--total_epoch')
    return c.train('--total_epoch', '0', '--decay_epoch', '0')


@case(TRAIN, 2)
def total_epoch_not_a_number(c):
    c.names += ['--total_epoch', 'abc']
    return c.train('--total_epoch', 'abc')


@case(TRAIN, 2)
def learning_rate_nan(c):
    c.names.append('--learning_rate')
    return c.train('--learning_rate', 'nan')


@case(TRAIN, 2)
def beta2_of_one(c):
    c.names.append('--beta2')
    return c.train('--beta2', '1')


@case(TRAIN, 2)
def gan_every_zero(c):
    c.names.append('--gan_every')
    return c.train('--gan_every', '0')


@case(TRAIN, 2)
def negative_loss_weight(c):
    c.names.append('--ccl_weight')
    return c.train('--ccl_weight', '-1')


@case(TRAIN, 2)
def unknown_flag(c):
    c.names.append('--epochs')
    return c.train('--epochs', '10')


@case(TRAIN, 2)
def missing_experiment_name(c):
    c.names.append('--experiment')
    return c.train()[2:]


@case(TRAIN, 2)
def missing_arguments_file(c):
    c.names.append('nofile.args')
    return ['@nofile.args', *c.train()]


@case(TRAIN, 2)
def arguments_file_with_bad_value(c):
    path = c.path('bad.args')
    with open(path, 'w') as f:
        f.write('# a recipe with a typo\n--batch_size -2\n')
    c.names.append('--batch_size')
    return [f'@{path}', *c.train()]


@case(TRAIN, 2)
def same_vendor_twice(c):
    c.names += ['--vendor1', '--vendor2']
    return c.train('--vendor1', 'Philips')


@case(TRAIN, 2)
def overwrite_and_resume_together(c):
    c.names += ['--overwrite', '--resume']
    return c.train('--overwrite', '--resume')


@case(TRAIN, 2)
def cuda_without_gpu(c):
    if torch.cuda.is_available():
        pytest.skip('a CUDA GPU is visible here')
    c.names.append('--device cuda')
    return c.train('--device', 'cuda')


def without_bfloat16_instructions(c):
    c.request.getfixturevalue('monkeypatch').setattr('utils.device.cpu_has_fast_bfloat16', lambda: False)


@case(TRAIN, 2)
def amp_on_a_cpu_without_bfloat16_instructions(c):
    without_bfloat16_instructions(c)
    c.names += ['--amp', 'bfloat16 instructions', '--amp auto']
    return c.train('--amp')


@case(TRAIN, 2)
def warm_up_without_matching_weight(c):
    """The warm-up trains with the paired term only: with --oml_weight 0 nothing would be trained."""
    c.names += ['--warmup_epochs', '--oml_weight']
    return c.train('--warmup_epochs', '1', '--oml_weight', '0')


@case(TRAIN, 2)
def amp_unknown_mode(c):
    c.names += ['--amp', 'fast']
    return c.train('--amp', 'fast')


# train.py: data
@case(TRAIN, 2)
def missing_data_root(c):
    c.names += ['--data_root', c.path('nowhere')]
    return c.train(data_root=c.path('nowhere'))


@case(TRAIN, 2)
def data_root_is_a_file(c):
    path = c.path('data.txt')
    with open(path, 'w') as f:
        f.write('not a folder\n')
    c.names.append(path)
    return c.train(data_root=path)


@case(TRAIN, 2)
def no_evalset(c):
    argv = c.train()
    shutil.rmtree(c.path('data', 'evalset'))
    c.names.append(c.path('data', 'evalset'))
    return argv


@case(TRAIN, 2)
def empty_trainset(c):
    argv = c.train()
    shutil.rmtree(c.path('data', 'trainset', 'subj_001'))
    c.names.append(c.path('data', 'trainset'))
    return argv


@case(TRAIN, 2)
def vendor_names_not_in_the_pickles(c):
    c.names.append("'GE'")
    return c.train('--vendor1', 'GE')


@case(TRAIN, 2)
def slice_missing_a_vendor(c):
    c.names.append("'Philips'")
    return c.bad_slice({'SIEMENS': tensor()})


@case(TRAIN, 2)
def slice_not_a_dict(c):
    return c.bad_slice([tensor(), tensor()])


@case(TRAIN, 2)
def slice_three_channels(c):
    return c.bad_slice({'SIEMENS': tensor((34, 40, 3)), 'Philips': tensor()})


@case(TRAIN, 2)
def slice_one_dimensional(c):
    return c.bad_slice({'SIEMENS': tensor((1360,)), 'Philips': tensor()})


@case(TRAIN, 2)
def slice_of_another_size(c):
    return c.bad_slice({'SIEMENS': tensor((30, 40, 1)), 'Philips': tensor((30, 40, 1))})


@case(TRAIN, 2)
def slice_vendors_differ_in_size(c):
    return c.bad_slice({'SIEMENS': tensor(), 'Philips': tensor((34, 38, 1))})


@case(TRAIN, 2)
def slice_too_small(c):
    return c.bad_slice({'SIEMENS': tensor((4, 4, 1)), 'Philips': tensor((4, 4, 1))})


@case(TRAIN, (0, 2))
def slices_too_small_for_the_discriminator(c):
    """16 x 16 slices pass the dataset's checks (H, W >= 8) but the discriminator needs at least 24 pixels: a
    trained model or a one-line error, never a traceback."""
    rng = np.random.default_rng(0)
    for split in ('trainset', 'evalset'):
        os.makedirs(c.path('small', split, 'subj_001'))
        for k in range(4):
            with open(c.path('small', split, 'subj_001', f'slice_{k}.pkl'), 'wb') as f:
                pickle.dump({v: rng.random((16, 16, 1), dtype=np.float32) for v in VENDORS}, f)
    argv = c.train('--lower_bound', '0', '--upper_bound', '1', '--total_epoch', '1', '--decay_epoch', '0',
                   '--batch_size', '4', '--sample_save_freq', '1000', '--log_freq', '1000', data_root=c.path('small'))
    c.absent.clear()  # a trained model is one of the two right answers
    c.unchanged.remove(c.path('results'))
    return argv


@case(TRAIN, 2)
def slice_string_array(c):
    return c.bad_slice({'SIEMENS': np.full((34, 40, 1), 'a'), 'Philips': tensor()})


@case(TRAIN, 2)
def slice_with_nan(c):
    image = tensor()
    image[3, 4, 0] = np.nan
    return c.bad_slice({'SIEMENS': tensor(), 'Philips': image})


@case(TRAIN, 2)
def slice_not_normalised(c):
    return c.bad_slice({'SIEMENS': tensor(value=2000.0), 'Philips': tensor()})


@case(TRAIN, 2)
def slice_holding_torch_tensors(c):
    return c.bad_slice({'SIEMENS': torch.zeros(34, 40, 1), 'Philips': torch.zeros(34, 40, 1)})


@case(TRAIN, 2)
def slice_truncated_pickle(c):
    return c.bad_slice(raw=pickle.dumps({v: tensor() for v in VENDORS})[:100])


@case(TRAIN, 2)
def slice_empty_file(c):
    return c.bad_slice(raw=b'')


@case(TRAIN, 2)
def evalset_slices_of_another_size(c):
    argv = c.train()
    folder = c.path('data', 'evalset', 'subj_002')
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), 'wb') as f:
            pickle.dump({v: tensor((32, 40, 1)) for v in VENDORS}, f)
    c.names.append('--image_size')
    return argv


@case(TRAIN, 0)
def slice_with_an_extra_key(c):
    """Harmless: an extra vendor key in a pickle is ignored (and training runs)."""
    argv = c.bad_slice({'SIEMENS': tensor(), 'Philips': tensor(), 'GE': tensor(), 'note': np.zeros(3)})
    c.absent.clear()
    c.unchanged.remove(c.path('results'))
    return argv + ['--total_epoch', '1', '--decay_epoch', '0', '--batch_size', '4',
                   '--lower_bound', '0.45', '--upper_bound', '0.55', '--sample_save_freq', '1000']


# train.py: results
@case(TRAIN, 2)
def experiment_exists_without_overwrite(c):
    c.names += [c.path('results', 'earlier'), '--overwrite']
    return c.train(ex='earlier')


@case(TRAIN, 1)
def save_dir_under_a_regular_file(c):
    argv = c.train()
    path = c.path('a_file')
    with open(path, 'w') as f:
        f.write('x')
    c.names.append('--save_dir')
    c.unchanged.append(path)
    return argv + ['--save_dir', os.path.join(path, 'results')]


@case(TRAIN, 2)
def resume_without_last_state(c):
    c.names += ['--resume', 'last.pth']
    return c.train('--resume', ex='earlier')


@case(TRAIN, 2)
def resume_from_truncated_state(c):
    argv = c.train('--resume', ex='earlier')
    path = c.path('results', 'earlier', 'model', 'last.pth')
    with open(path, 'wb') as f:
        f.write(b'PK\x03\x04 truncated')
    c.names.append(path)
    return argv


@case(TRAIN, 2)
def resume_from_a_generator_checkpoint(c):
    """model/last.pth replaced by a plain state_dict (e.g. a netG file copied over it): loads with
    weights_only=True but is no training state."""
    argv = c.train('--resume', ex='earlier')
    path = c.path('results', 'earlier', 'model', 'last.pth')
    torch.save({'model.1.weight': torch.zeros(8, 1, 7, 7)}, path)
    c.names.append(path)
    return argv


# generate_paired_dataset.py
@case(GENERATE, 2)
def split_ratio_above_one(c):
    c.names.append('--split_ratio')
    return c.generate('--split_ratio', '1.5')


@case(GENERATE, 2)
def negative_test_ratio(c):
    c.names.append('--test_ratio')
    return c.generate('--test_ratio', '-0.1')


@case(GENERATE, 2)
def image_size_too_small(c):
    c.names.append('--image_size')
    return c.generate('--image_size', '4', '4')


@case(GENERATE, 2)
def image_size_not_a_number(c):
    c.names.append('--image_size')
    return c.generate('--image_size', '64', 'x')


@case(GENERATE, 2)
def same_vendor_names(c):
    c.names += ['--vendor1', '--vendor2']
    return c.generate('--vendor2', 'SIEMENS')


@case(GENERATE, 2)
def unknown_flag_gen(c):
    c.names.append('--outdir')
    return c.generate('--outdir', 'x')


@case(GENERATE, 2)
def missing_output_dir_flag(c):
    argv = c.generate()
    c.names.append('--output_dir')
    return argv[:4]


@case(GENERATE, 2)
def missing_vendor_folder(c):
    argv = c.generate()
    c.names.append(c.path('GE'))
    return argv + ['--vendor2_dir', c.path('GE')]


@case(GENERATE, 2)
def empty_vendor_folder(c):
    argv = c.generate()
    os.makedirs(c.path('empty'))
    with open(c.path('empty', 'readme.txt'), 'w') as f:
        f.write('no scans here\n')
    c.unchanged.append(c.path('empty'))
    c.names.append(c.path('empty'))
    return argv + ['--vendor1_dir', c.path('empty')]


@case(GENERATE, 2)
def no_matching_subject_names(c):
    """One subject per vendor and no pair: each is a single-vendor subject, and none is left to evaluate."""
    argv = c.generate(subjects=1)
    for name in os.listdir(c.path('Philips')):
        os.rename(c.path('Philips', name), c.path('Philips', 'other_' + name))
    c.names += ['SIEMENS', 'evaluation']
    return argv


@case(GENERATE, 2)
def only_one_subject(c):
    c.names.append('subjects')
    return c.generate(subjects=1)


@case(GENERATE, 2)
def mismatched_pair_shapes(c):
    argv = c.generate(subjects=1)
    data, affine = c.template
    save_nifti(c.path('Philips', 'subj_001.nii.gz'), second_vendor(data)[:, :, 2:], affine)
    c.names += [c.path('SIEMENS', 'subj_001.nii.gz'), c.path('Philips', 'subj_001.nii.gz')]
    c.prefix = 'skipped:'
    return argv


@case(GENERATE, 2)
def mismatched_pair_affines(c):
    argv = c.generate(subjects=1)
    data, affine = c.template
    shifted = affine.copy()
    shifted[:3, 3] += 12
    save_nifti(c.path('Philips', 'subj_001.nii.gz'), second_vendor(data), shifted)
    c.names += [c.path('Philips', 'subj_001.nii.gz'), '--resample']
    c.prefix = 'skipped:'
    return argv


@case(GENERATE, 2)
def subjects_of_different_in_plane_sizes(c):
    argv = c.generate()
    data, affine = c.template
    small = subject_volume(data, 1)[:30]
    save_nifti(c.path('SIEMENS', 'subj_002.nii.gz'), small, affine)
    save_nifti(c.path('Philips', 'subj_002.nii.gz'), second_vendor(small, 1), affine)
    c.names.append('--image_size')
    return argv


@case(GENERATE, 2)
def volumes_and_slice_folders_mixed(c):
    argv = c.generate()
    shutil.rmtree(c.path('Philips'))
    for subject in ('subj_001', 'subj_002'):
        os.makedirs(c.path('Philips', subject))
        np.save(c.path('Philips', subject, 'slice_000.npy'), np.ones((34, 40), np.float32))
    c.names += [c.path('SIEMENS'), c.path('Philips')]
    return argv


def slice_folders(c, subjects=('subj_001',)):
    """SIEMENS/ and Philips/ as sub-folders of 2-D .npy slices."""
    data = c.template[0]
    for vendor, volume in zip(VENDORS, (data, second_vendor(data))):
        for subject in subjects:
            os.makedirs(c.path(vendor, subject))
            for k in range(0, 33, 4):
                np.save(c.path(vendor, subject, f'slice_{k:03d}.npy'), volume[:, :, k])
    output = earlier_dataset(c.path('dataset'))
    c.unchanged += [c.path(VENDORS[0]), c.path(VENDORS[1]), output]
    return ['--vendor1_dir', c.path(VENDORS[0]), '--vendor2_dir', c.path(VENDORS[1]), '--output_dir', output,
            '--overwrite']


@case(GENERATE, 2)
def corrupt_png_slice(c):
    argv = slice_folders(c)
    with open(c.path('SIEMENS', 'subj_001', 'slice_999.png'), 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n' + b'garbage' * 20)
    np.save(c.path('Philips', 'subj_001', 'slice_999.npy'), c.template[0][:, :, 0])  # its partner, by file stem
    c.names.append(c.path('SIEMENS', 'subj_001'))
    c.prefix = 'skipped:'
    return argv


@case(GENERATE, 2)
def three_d_npy_slice(c):
    argv = slice_folders(c)
    np.save(c.path('Philips', 'subj_001', 'slice_004.npy'), np.ones((34, 40, 5), np.float32))
    c.names.append(c.path('Philips', 'subj_001', 'slice_004.npy'))
    c.prefix = 'skipped:'
    return argv


@case(GENERATE, 2)
def slices_of_different_sizes_in_a_folder(c):
    argv = slice_folders(c)
    np.save(c.path('SIEMENS', 'subj_001', 'slice_008.npy'), np.ones((30, 40), np.float32))
    c.names.append(c.path('SIEMENS', 'subj_001'))
    c.prefix = 'skipped:'
    return argv


@case(GENERATE, 2)
def output_equal_to_input(c):
    argv = c.generate()
    c.names.append('--output_dir')
    return argv + ['--output_dir', c.path('SIEMENS')]


@case(GENERATE, 2)
def output_inside_input(c):
    argv = c.generate()
    c.names.append('--output_dir')
    return argv + ['--output_dir', c.path('Philips', 'dataset')]


@case(GENERATE, 2)
def existing_dataset_without_overwrite(c):
    argv = c.generate(overwrite=False)
    c.names += [c.path('dataset'), '--overwrite']
    return argv


@case(GENERATE, 1)
def output_dir_under_a_regular_file(c):
    argv = c.generate()
    path = c.path('a_file')
    with open(path, 'w') as f:
        f.write('x')
    c.unchanged.append(path)
    c.names.append('--output_dir')
    return argv + ['--output_dir', os.path.join(path, 'dataset')]


# generate_paired_dataset.py: single-vendor subjects, --unpaired, --test_subjects, --voxel_size ----------
def rename_subjects(c, vendor, prefix):
    """Give vendor's subjects other names, so no subject is in both folders."""
    for name in sorted(os.listdir(c.path(vendor))):
        os.rename(c.path(vendor, name), c.path(vendor, prefix + name))


@case(GENERATE, 2)
def one_vendor_without_a_usable_volume(c):
    argv = c.generate(subjects=3)
    rename_subjects(c, 'Philips', 'p_')
    for name in os.listdir(c.path('SIEMENS')):
        save_nifti(c.path('SIEMENS', name), np.zeros_like(c.template[0]), c.template[1])
    c.names += ['--vendor1_dir', c.path('SIEMENS')]
    return argv


@case(GENERATE, 2)
def listed_test_subjects_hold_out_every_subject_of_a_vendor(c):
    argv = c.generate(subjects=3)
    rename_subjects(c, 'Philips', 'p_')
    os.remove(c.path('SIEMENS', 'subj_003.nii.gz'))
    c.names += ['SIEMENS', '--test_subjects', 'subj_001, subj_002']
    return argv + ['--test_subjects', 'subj_001', 'subj_002', 'p_subj_001']


@case(GENERATE, 2)
def ratio_holds_out_every_subject_of_a_vendor(c):
    """SIEMENS has one subject, only in its folder: --test_ratio 0.6 of a group of one holds it out."""
    argv = c.generate(subjects=3)
    rename_subjects(c, 'Philips', 'p_')
    for name in ('subj_002.nii.gz', 'subj_003.nii.gz'):
        os.remove(c.path('SIEMENS', name))
    c.names += ['SIEMENS', 'subj_001', '--test_ratio']
    return argv + ['--test_ratio', '0.6']


@case(GENERATE, 2)
def no_evaluation_subject_of_a_vendor(c):
    argv = c.generate(subjects=3)
    rename_subjects(c, 'Philips', 'p_')
    for name in ('subj_002.nii.gz', 'subj_003.nii.gz'):
        os.remove(c.path('SIEMENS', name))
    c.names += ['SIEMENS', 'subj_001', 'evaluation']
    return argv


@case(GENERATE, 2)
def voxel_sizes_differ_without_voxel_size(c):
    argv = c.generate(subjects=2)
    fine = mni_t1(resolution=4)
    data = subject_volume(np.asarray(fine.dataobj, dtype=np.float32), 1)
    save_nifti(c.path('SIEMENS', 'subj_002.nii.gz'), data, fine.affine)
    save_nifti(c.path('Philips', 'subj_002.nii.gz'), second_vendor(data, 1), fine.affine)
    c.names += [c.path('SIEMENS', 'subj_001.nii.gz'), c.path('SIEMENS', 'subj_002.nii.gz'), '--voxel_size']
    return argv


@case(GENERATE, 2)
def unpaired_folder_name_taken_by_a_subject(c):
    argv = c.generate(subjects=2)
    data, affine = c.template
    save_nifti(c.path('Philips', 'subj_001_SIEMENS.nii.gz'), second_vendor(subject_volume(data, 4)), affine)
    c.names += ['--unpaired', 'subj_001_SIEMENS', c.path('Philips')]
    return argv + ['--unpaired']


@case(GENERATE, 2)
def unknown_test_subject(c):
    c.names += ['--test_subjects', 'nobody']
    return c.generate('--test_subjects', 'nobody', subjects=3)


@case(GENERATE, 2)
def unusable_test_subject(c):
    argv = c.generate('--test_subjects', 'subj_002', subjects=3)
    save_nifti(c.path('SIEMENS', 'subj_002.nii.gz'), np.zeros_like(c.template[0]), c.template[1])
    c.names += ['--test_subjects', 'subj_002']
    return argv


@case(GENERATE, 2)
def voxel_size_of_two_values(c):
    c.names.append('--voxel_size')
    return c.generate('--voxel_size', '2', '3')


@case(GENERATE, 2)
def voxel_size_zero(c):
    c.names.append('--voxel_size')
    return c.generate('--voxel_size', '0')


@case(GENERATE, 2)
def voxel_size_for_2d_slices(c):
    c.names.append('--voxel_size')
    return slice_folders(c, subjects=('subj_001', 'subj_002')) + ['--voxel_size', '2']
# ---- end of the single-vendor / --unpaired / --test_subjects / --voxel_size block ----------------


# inference_nii.py: flags and folders
@case(INFER, 2)
def missing_experiment(c):
    argv = c.infer()
    c.names.append(c.path('nothing_here'))
    return argv + ['--save_dir', c.tmp, '--experiment', 'nothing_here']


@case(INFER, 2)
def unknown_source_vendor(c):
    c.names += ['--src_vendor', 'GE']
    return c.infer('--src_vendor', 'GE')


@case(INFER, 2)
def source_equals_target_vendor(c):
    c.names += ['--src_vendor', '--trg_vendor']
    return c.infer('--trg_vendor', 'SIEMENS')


@case(INFER, 2)
def epoch_not_a_number(c):
    c.names += ['--epoch', 'abc']
    return c.infer('--epoch', 'abc')


@case(INFER, 2)
def epoch_negative(c):
    c.names += ['--epoch', '-1']
    return c.infer('--epoch=-1')


@case(INFER, 2)
def epoch_never_saved(c):
    c.names += ['netG_S_to_P_epoch_99.pth', '--epoch']
    return c.infer('--epoch', '99')


@case(INFER, 2)
def negative_batch_size_inference(c):
    c.names.append('--batch_size')
    return c.infer('--batch_size', '-4')


@case(INFER, 2)
def amp_on_a_cpu_without_bfloat16_instructions_inference(c):
    without_bfloat16_instructions(c)
    c.names += ['--amp', 'bfloat16 instructions']
    return c.infer('--amp', 'on')


@case(INFER, 2)
def unknown_flag_inference(c):
    c.names.append('--input')
    return c.infer('--input', 'x')


@case(INFER, 2)
def missing_input_dir(c):
    c.names += ['--input_dir', c.path('nowhere')]
    return c.infer(input_dir=c.path('nowhere'))


@case(INFER, 2)
def input_dir_without_nifti(c):
    os.makedirs(c.path('scans'))
    with open(c.path('scans', 'subject.dcm'), 'wb') as f:
        f.write(b'DICM')
    c.unchanged.append(c.path('scans'))
    c.names += ['--input_dir', c.path('scans')]
    return c.infer(input_dir=c.path('scans'))


@case(INFER, 2)
def output_equal_to_input_inference(c):
    c.names.append('--output_dir')
    return c.infer(output_dir=c.path('in'))


@case(INFER, 1)
def output_under_a_regular_file(c):
    path = c.path('a_file')
    with open(path, 'w') as f:
        f.write('x')
    c.unchanged.append(path)
    c.names.append('--output_dir')
    return c.infer(output_dir=os.path.join(path, 'out'))


@case(INFER, 1)
def read_only_output_folder(c):
    if os.geteuid() == 0:
        pytest.skip('root writes into read-only folders; output_under_a_regular_file covers this path')
    argv = c.infer()
    os.chmod(c.path('out'), 0o555)
    c.request.addfinalizer(lambda: os.chmod(c.path('out'), 0o755))
    c.names.append('--output_dir')
    return argv


@case(INFER, 2)
def missing_reference_dir(c):
    c.names += ['--reference_dir', c.path('refs')]
    return c.infer('--reference_dir', c.path('refs'))


@case(INFER, 1)
def reference_on_another_grid(c):
    data, affine = c.template
    save_nifti(c.path('refs', 'b_good.nii.gz'), data[:, :, 1:], affine)
    c.unchanged.append(c.path('refs'))
    argv = c.infer('--reference_dir', c.path('refs'))
    c.absent.clear()
    c.names.append(c.path('refs', 'b_good.nii.gz'))
    c.prefix = 'failed:'
    return argv


# inference_nii.py: spoiled experiment folders
@case(INFER, 2)
def arguments_txt_missing(c):
    experiment_dir = c.copy_experiment()
    os.remove(os.path.join(experiment_dir, 'arguments.txt'))
    c.names.append(os.path.join(experiment_dir, 'arguments.txt'))
    return c.infer(experiment_dir=experiment_dir)


@case(INFER, 2)
def arguments_txt_not_json(c):
    experiment_dir = c.copy_experiment()
    with open(os.path.join(experiment_dir, 'arguments.txt'), 'w') as f:
        f.write('--ngf 8\n--n_res_blocks 2\n')
    c.names.append(os.path.join(experiment_dir, 'arguments.txt'))
    return c.infer(experiment_dir=experiment_dir)


@case(INFER, 2)
def arguments_txt_without_network_flags(c):
    """An arguments.txt that is JSON but lacks the keys inference needs (an older or hand-edited file) for a
    checkpoint written before the network's configuration was stored with it."""
    experiment_dir = c.copy_experiment()
    checkpoint = os.path.join(experiment_dir, 'model', 'netG_S_to_P_epoch_2.pth')
    torch.save(torch.load(checkpoint, weights_only=True)['state_dict'], checkpoint)
    path = os.path.join(experiment_dir, 'arguments.txt')
    with open(path) as f:
        arguments = json.load(f)
    for key in ('ngf', 'n_res_blocks'):
        del arguments[key]
    with open(path, 'w') as f:
        json.dump(arguments, f)
    c.names.append(path)
    return c.infer(experiment_dir=experiment_dir)


@case(INFER, 2)
def checkpoint_of_another_architecture(c):
    from model.generator import Generator
    experiment_dir = c.copy_experiment()
    path = os.path.join(experiment_dir, 'model', 'netG_S_to_P_epoch_2.pth')
    torch.save(Generator(ngf=16, n_res_blocks=3).state_dict(), path)
    c.names.append(path)
    return c.infer(experiment_dir=experiment_dir)


@case(INFER, 2)
def checkpoint_not_a_state_dict(c):
    experiment_dir = c.copy_experiment()
    path = os.path.join(experiment_dir, 'model', 'netG_S_to_P_epoch_2.pth')
    torch.save([torch.zeros(3), torch.ones(2)], path)
    c.names.append(path)
    return c.infer(experiment_dir=experiment_dir)


@case(INFER, 2)
def checkpoint_truncated(c):
    experiment_dir = c.copy_experiment()
    path = os.path.join(experiment_dir, 'model', 'netG_S_to_P_epoch_2.pth')
    with open(path, 'rb') as f:
        raw = f.read()
    with open(path, 'wb') as f:
        f.write(raw[:len(raw) // 2])
    c.names.append(path)
    return c.infer(experiment_dir=experiment_dir)


@case(INFER, 2)
def checkpoint_empty_file(c):
    experiment_dir = c.copy_experiment()
    path = os.path.join(experiment_dir, 'model', 'netG_S_to_P_epoch_2.pth')
    open(path, 'wb').close()
    c.names.append(path)
    return c.infer(experiment_dir=experiment_dir)


@case(INFER, (0, 2))
def best_checkpoint_without_best_json(c):
    """--epoch best with netG_S_to_P_best.pth present but model/best.json lost: work, or say what is missing."""
    experiment_dir = c.copy_experiment()
    os.remove(os.path.join(experiment_dir, 'model', 'best.json'))
    argv = c.infer('--epoch', 'best', experiment_dir=experiment_dir)
    c.absent.clear()
    c.names.append('best.json')
    return argv


@pytest.mark.parametrize('name', sorted(CASES))
def test_bad_input(name, template, tmp_path, request):
    script, code, build = CASES[name]
    c = Case(tmp_path, template, request)
    argv = build(c)
    before, kept = tree(*c.unchanged), tree(*c.kept)
    result = run_script(script, argv, cwd=tmp_path)
    if code == 0:
        assert 'Traceback' not in result.out + result.err, show(result)
        assert result.code == 0, show(result)
    elif isinstance(code, tuple) and result.code == 0:
        assert 'Traceback' not in result.out + result.err, show(result)
    else:
        check_user_error(result, code, c.names, prefix=c.prefix)
        if c.prefix != 'error:':
            assert last_line(result.err).startswith('error:') or result.code == 1, show(result)
    assert tree(*c.unchanged) == before, 'an input or earlier result changed'
    after = tree(*c.kept)
    assert {k: after.get(k) for k in kept} == kept, 'an earlier result changed'
    for path in c.absent:
        assert not os.path.exists(path), f'{path} was written by a failed run'


# ---- 3. malicious pickles and checkpoints ------------------------------------------------------

class Payload:
    """Unpickling this runs `touch MARKER` (the reduce protocol calls os.system)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f'touch "{self.marker}"',)


def unsafe_load(path, kind):
    """What a careless loader would do with the file (to prove the payload is real)."""
    if kind == 'pickle':
        with open(path, 'rb') as f:
            return pickle.load(f)
    if kind == 'npy':
        return np.load(path, allow_pickle=True)
    return torch.load(path, map_location='cpu', weights_only=False)


MALICIOUS = ('slice_pickle', 'slice_pickle_inside_dict', 'npy_slice', 'inference_checkpoint', 'resume_state')


@pytest.mark.parametrize('where', MALICIOUS)
def test_malicious_file_is_refused_without_running_it(where, template, tmp_path, request):
    marker = tmp_path / 'markers' / 'pwned'
    marker.parent.mkdir()
    payload = Payload(marker)
    c = Case(tmp_path / 'case', template, request)
    os.makedirs(c.tmp)
    if where.startswith('slice_pickle'):
        argv = c.bad_slice(payload if where == 'slice_pickle' else {'SIEMENS': payload, 'Philips': tensor()})
        script, path, kind = TRAIN, c.names[0], 'pickle'
    elif where == 'npy_slice':
        argv = slice_folders(c)
        path = c.path('SIEMENS', 'subj_001', 'slice_004.npy')
        np.save(path, np.array([payload, 1], dtype=object), allow_pickle=True)
        c.names.append(c.path('SIEMENS', 'subj_001'))
        c.prefix = 'skipped:'
        script, kind = GENERATE, 'npy'
    elif where == 'inference_checkpoint':
        experiment_dir = c.copy_experiment()
        path = os.path.join(experiment_dir, 'model', 'netG_S_to_P_epoch_1.pth')
        torch.save(payload, path)
        argv = c.infer('--epoch', '1', experiment_dir=experiment_dir)
        c.names.append(path)
        script, kind = INFER, 'torch'
    else:
        experiment_dir = c.copy_experiment()
        path = os.path.join(experiment_dir, 'model', 'last.pth')
        torch.save({'epoch': 2, 'args': payload}, path)
        argv = c.train('--resume', *TINY_TRAIN_FLAGS, data_root=request.getfixturevalue('pickle_dataset'), ex='exp')
        c.names.append(path)
        script, kind = TRAIN, 'torch'
    before = tree(*c.unchanged)
    result = run_script(script, argv, cwd=c.tmp)
    check_user_error(result, 2, c.names, prefix=c.prefix)
    assert not marker.exists(), 'the payload ran'
    assert tree(*c.unchanged) == before
    # control: the same bytes, loaded carelessly in another folder, do run the payload
    elsewhere = tmp_path / 'control'
    elsewhere.mkdir()
    copy = shutil.copy(path, elsewhere / os.path.basename(path))
    try:
        unsafe_load(copy, kind)
    except Exception:
        pass  # the payload runs while unpickling, before anything can fail
    assert marker.exists(), 'the control payload did not run: the test proves nothing'


# ---- 4. a killed inference leaves no output that looks complete --------------------------------

def test_killed_inference_leaves_no_truncated_output(experiment, tmp_path):
    """SIEMENS -> Philips on 2 mm volumes, killed (SIGKILL) at the moment a temporary output file appears
    (mid-write), then at a moment after the first output is complete: every *_harmonized.nii.gz present
    loads completely; a rerun finishes the folder."""
    image = mni_t1(resolution=2)
    data = np.asarray(image.dataobj, dtype=np.float32)
    input_dir = tmp_path / 'in'
    for index in range(4):
        save_nifti(input_dir / f'vol_{index + 1}.nii.gz', subject_volume(data, index), image.affine)
    before = tree(input_dir, experiment)
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    for moment in ('first temporary file', 'after the first output'):
        output_dir = tmp_path / moment.replace(' ', '_')
        command = [sys.executable, os.path.join(REPO, INFER), *infer_args(experiment, input_dir, output_dir)]
        with open(tmp_path / 'log.txt', 'w') as log:
            process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=log)
        deadline, finished_at = time.time() + 240, None
        try:
            while time.time() < deadline and process.poll() is None:
                names = os.listdir(output_dir) if output_dir.exists() else []
                if moment == 'first temporary file' and any(n.startswith('.') and 'harmonized' in n for n in names):
                    break  # the first output is being written under its temporary name
                if any(n.endswith('_harmonized.nii.gz') for n in names):
                    finished_at = finished_at or time.time()
                    if time.time() - finished_at > 0.3:  # now inside the second volume
                        break
                time.sleep(0.002)
            assert process.poll() is None, ('inference ended before it could be killed; use more volumes\n'
                                            + (tmp_path / 'log.txt').read_text()[-2000:])
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
        assert process.returncode == -signal.SIGKILL
        for name in os.listdir(output_dir):
            assert name.endswith('_harmonized.nii.gz') or name.startswith('.'), \
                f'{name}: a temporary file must be hidden and not look like an output'
            if name.endswith('_harmonized.nii.gz'):
                check_complete_output(str(output_dir / name), data.shape)
    assert tree(input_dir, experiment) == before
    result = run_script(INFER, infer_args(experiment, input_dir, output_dir), cwd=tmp_path)
    assert result.code == 0, show(result)
    for index in range(4):
        check_complete_output(str(output_dir / f'vol_{index + 1}_harmonized.nii.gz'), data.shape)
    assert tree(input_dir, experiment) == before


# ---- 5. the same error path in real processes, and --debug -------------------------------------

def real_process_case(script, tmp):
    missing = os.path.join(tmp, 'nowhere')
    if script == TRAIN:
        return ['-ex', 'x', '--data_root', missing, '--save_dir', os.path.join(tmp, 'results'), '--device', 'cpu'], \
            '--data_root'
    if script == GENERATE:
        return ['--vendor1_dir', missing, '--vendor2_dir', missing, '--output_dir', os.path.join(tmp, 'out')], missing
    return ['--input_dir', missing, '--output_dir', os.path.join(tmp, 'out'), '--device', 'cpu'], '--input_dir'


@pytest.mark.parametrize('script', [TRAIN, GENERATE, INFER], ids=SHORT.get)
def test_user_error_in_a_real_process(script, tmp_path):
    argv, name = real_process_case(script, str(tmp_path))
    result = run_process(script, argv, cwd=tmp_path)
    check_user_error(result, 2, [name])
    assert not [line for line in lines(result.err) if line.startswith('usage:')], show(result)  # no usage dump


def test_debug_shows_the_traceback_in_a_real_process(tmp_path):
    argv, _ = real_process_case(TRAIN, str(tmp_path))
    result = run_process(TRAIN, [*argv, '--debug'], cwd=tmp_path)
    assert result.code != 0
    assert 'Traceback' in result.err and 'UserError' in result.err and '--data_root' in result.err, show(result)


@pytest.mark.parametrize('script', [GENERATE, INFER], ids=SHORT.get)
def test_debug_shows_the_traceback(script, tmp_path):
    argv, name = real_process_case(script, str(tmp_path))
    result = run_script(script, [*argv, '--debug'], cwd=tmp_path)
    assert result.code != 0
    assert 'Traceback' in result.err and 'UserError' in result.err and name in result.err, show(result)
