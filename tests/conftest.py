"""Shared test data: small real MRI (the MNI152 T1 template shipped in nilearn) and a second "vendor" made from it;
one small experiment written once per session; and the split into fast and slow tests.

The second vendor here is built by other means than dataset/make_demo_data.py (a gamma curve, a blur and
another intensity scale), so tests do not only check the project against its own demo generator.
"""
import collections
import contextlib
import functools
import inspect
import io
import json
import os
import pickle
import re
import runpy
import sys
import traceback

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, ornt_transform
from scipy import ndimage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, 'tests')


def mni_t1(resolution=4):
    """The MNI152 T1 template at `resolution` mm as a float32 RAS nibabel image."""
    from nilearn.datasets import load_mni152_template
    image = load_mni152_template(resolution=resolution)
    return nib.Nifti1Image(np.asarray(image.dataobj, dtype=np.float32), image.affine)


def second_vendor(data, subject=0):
    """Another scanner's view of the same anatomy: a gamma curve, a blur and a 4x intensity scale."""
    unit = data / max(float(data.max()), 1e-6)
    out = 4000 * ndimage.gaussian_filter(unit ** (1.4 + 0.05 * subject), 0.7)
    out[data == 0] = 0
    return out.astype(np.float32)


def subject_volume(data, subject):
    """A slightly different 'subject': a smooth intensity change and a shift of one voxel per subject."""
    shifted = np.roll(data, subject % 3 - 1, axis=0)
    ramp = np.linspace(0.9, 1.1, data.shape[1])[None, :, None]
    return (shifted * ramp).astype(np.float32)


def write_pickle_dataset(root, vendors=('SIEMENS', 'Philips'), subjects=(3, 1), resolution=4, size=None):
    """A dataset in the seed's pickle layout built directly from the template (no project code involved).

    subjects = (number of train subjects, number of eval subjects). Returns root.
    """
    base = np.asarray(mni_t1(resolution).dataobj, dtype=np.float32)
    index = 0
    for split, count in zip(('trainset', 'evalset'), subjects):
        for _ in range(count):
            a = subject_volume(base, index)
            b = second_vendor(a, index)
            a, b = a / np.percentile(a[a > 0], 99.5), b / np.percentile(b[b > 0], 99.5)
            folder = os.path.join(root, split, f'subj_{index + 1:03d}')
            os.makedirs(folder)
            for k in range(a.shape[2]):
                sa, sb = np.clip(a[:, :, k], 0, 1), np.clip(b[:, :, k], 0, 1)
                if size is not None:
                    sa, sb = sa[:size[0], :size[1]], sb[:size[0], :size[1]]
                with open(os.path.join(folder, f'slice_{k:03d}.pkl'), 'wb') as f:
                    pickle.dump({vendors[0]: sa[..., None].astype(np.float32),
                                 vendors[1]: sb[..., None].astype(np.float32)}, f)
            index += 1
    return str(root)


@pytest.fixture(autouse=True, scope='session')
def one_torch_thread():
    """Tiny test networks run fastest on one thread (two threads spin on a loaded 2-core machine)."""
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope='session')
def pickle_dataset(tmp_path_factory):
    """3 train + 1 eval subjects of 4 mm MNI slices (49x58) in the seed's layout."""
    return write_pickle_dataset(tmp_path_factory.mktemp('pickles'))


TINY_TRAIN_FLAGS = ['--total_epoch', '2', '--batch_size', '2', '--ngf', '8', '--n_res_blocks', '2', '--ndf', '8',
                    '--decay_epoch', '1', '--save_freq', '1', '--num_workers', '0', '--device', 'cpu',
                    '--lower_bound', '0.3', '--upper_bound', '0.6', '--sample_save_freq', '1000', '--log_freq', '1000']


def tiny_train_flags(**overrides):
    """TINY_TRAIN_FLAGS with some values replaced (flag name without dashes -> value)."""
    flags = list(TINY_TRAIN_FLAGS)
    for name, value in overrides.items():
        index = flags.index(f'--{name}')
        flags[index + 1] = str(value)
    return flags


# ---- scans on disk ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _template(resolution):
    image = mni_t1(resolution)
    return np.asarray(image.dataobj, dtype=np.float32), image.affine


def siemens(subject=0, resolution=6):
    """(data, affine) of a vendor-1-like RAS volume, values up to about 1000."""
    data, affine = _template(resolution)
    return 1000 * subject_volume(data, subject), affine.copy()


def philips(subject=0, resolution=6):
    data, affine = siemens(subject, resolution)
    return second_vendor(data, subject), affine


def reoriented(image, codes):
    """The same image stored with axis codes `codes` (the affine follows, so the anatomy is unchanged)."""
    return image.as_reoriented(ornt_transform(axcodes2ornt('RAS'), axcodes2ornt(tuple(codes))))


def save_scan(data, affine, path, codes='RAS', int16=False):
    """A NIfTI file stored with axis codes `codes`, as int16 with a scl_slope (as scanners write) if `int16`."""
    image = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    if tuple(codes) != tuple('RAS'):
        image = reoriented(image, codes)
    if int16:
        image.set_data_dtype(np.int16)  # nibabel picks a scl_slope on save
    image.set_qform(image.affine, code='scanner')
    image.set_sform(image.affine, code='scanner')
    nib.save(image, str(path))
    return str(path)


# ---- scripts in this process --------------------------------------------------------------------

Result = collections.namedtuple('Result', 'code out err')


def run_script(script, argv, cwd):
    """Run a script's `__main__` in this process, as `python script argv...` would, and capture what it prints.

    An exception that escapes is printed as Python would (a traceback) with exit code 1.
    """
    path = os.path.join(REPO, script)
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_cwd, saved_path = sys.argv, os.getcwd(), list(sys.path)
    sys.argv = [path, *map(str, argv)]
    os.chdir(cwd)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(path, run_name='__main__')
            except SystemExit as exit_:
                if exit_.code is None or isinstance(exit_.code, int):
                    code = exit_.code or 0
                else:
                    print(exit_.code, file=sys.stderr)
                    code = 1
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        sys.path[:] = saved_path
    return Result(code, out.getvalue(), err.getvalue())


# ---- one small experiment per session -----------------------------------------------------------

EXPERIMENT_FLAGS = tiny_train_flags(lower_bound=0.45, upper_bound=0.55)


def run_or_fail(script, argv, cwd):
    result = run_script(script, argv, cwd)
    assert result.code == 0, f'{script} failed:\n{result.out[-2000:]}\n{result.err[-3000:]}'
    return result


@pytest.fixture(scope='session')
def tiny_experiment(tmp_path_factory):
    """The user's recipe once, in this process: 6 subjects of 6 mm scans (vendor 2 int16, stored LPS or axial
    first) -> generate_paired_dataset.py (2 test subjects) -> train.py, 2 epochs of tiny networks.

    Shared by every test that needs a trained experiment; none may change it (copy it to spoil it)."""
    root = tmp_path_factory.mktemp('tiny_experiment')
    scans = [root / 'scans' / vendor for vendor in ('SIEMENS', 'Philips')]
    for folder in scans:
        folder.mkdir(parents=True)
    for i in range(6):
        name = f'subj_{i + 1:03d}.nii.gz'
        save_scan(*siemens(i), scans[0] / name)
        save_scan(*philips(i), scans[1] / name, codes=('LPS', 'SLP')[i % 2], int16=True)
    dataset = root / 'dataset'
    run_or_fail('dataset/generate_paired_dataset.py', ['--vendor1_dir', scans[0], '--vendor2_dir', scans[1],
                                                       '--output_dir', dataset, '--test_ratio', '0.34',
                                                       '--split_ratio', '0.7'], cwd=root)
    results = root / 'results'
    trained = run_or_fail('train.py', ['-ex', 'tiny', '--data_root', dataset, '--save_dir', results,
                                       *EXPERIMENT_FLAGS], cwd=root)
    experiment_dir = os.path.join(str(results), 'tiny')
    with open(os.path.join(experiment_dir, 'dataset_info.json')) as f:
        info = json.load(f)
    with open(os.path.join(experiment_dir, 'model', 'best.json')) as f:
        best = json.load(f)
    return {'root': root, 'scans': scans, 'dataset': dataset, 'results': str(results), 'dir': experiment_dir,
            'name': 'tiny', 'info': info, 'best': best, 'stdout': trained.out}


@pytest.fixture(scope='session')
def tiny_experiment_input_skip(tiny_experiment):
    """The same data, one epoch of a generator with --input_skip; path of the experiment folder."""
    root = tiny_experiment['root']
    run_or_fail('train.py', ['-ex', 'skip', '--data_root', tiny_experiment['dataset'], '--save_dir',
                             root / 'results_input_skip', '--input_skip',
                             *tiny_train_flags(lower_bound=0.45, upper_bound=0.5, total_epoch=1, decay_epoch=0)],
                cwd=root)
    return os.path.join(str(root), 'results_input_skip', 'skip')


# ---- fast and slow tests ------------------------------------------------------------------------
# A test is slow when it, a fixture it asks for or a test helper it calls starts a process (a fresh Python
# costs seconds of imports) or runs a whole training; the session fixtures above are built once and do not
# count. `make test` runs the others (-m "not slow"), `make test-all` everything.

STARTS_A_PROCESS = re.compile(r'\bsys\.executable\b|\bsubprocess\.(run|Popen|call|check_call|check_output)\b'
                              r'|\bos\.(system|fork)\b')
TRAINS = re.compile(r'\btrain\.main\b|\.fit\(\)')  # train.py's main, CycleGANTrainer.fit()


def referenced_names(code):
    names = set(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            names |= referenced_names(const)
    return names


def slow_reasons(function, seen=None):
    """Why calling `function` is slow ('starts a process', 'trains'), following the test helpers it calls."""
    seen = set() if seen is None else seen
    if not inspect.isfunction(function) or function in seen:
        return set()
    seen.add(function)
    try:
        if os.path.dirname(os.path.abspath(inspect.getsourcefile(function))) != TESTS:
            return set()  # the project's own code is what the tests measure, not how they run it
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return set()
    reasons = {reason for reason, pattern in (('starts a process', STARTS_A_PROCESS), ('trains', TRAINS))
               if pattern.search(source)}
    for name in referenced_names(function.__code__):
        reasons |= slow_reasons(function.__globals__.get(name), seen)
    return reasons


def pytest_collection_modifyitems(items):
    for item in items:
        if not isinstance(item, pytest.Function):
            continue
        fixtures = [definitions[-1] for definitions in item._fixtureinfo.name2fixturedefs.values() if definitions]
        functions = [item.function] + [fixture.func for fixture in fixtures if fixture.scope != 'session']
        seen, reasons = set(), set()
        for function in functions:
            reasons |= slow_reasons(function, seen)
        if reasons:
            item.add_marker(pytest.mark.slow(reason=', '.join(sorted(reasons))))
