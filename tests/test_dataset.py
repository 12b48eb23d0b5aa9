"""Paired_Dataset: items, slice range selection in numeric order, the safe pickle loader, and bad data."""
import math
import os
import pickle
import re

import numpy as np
import pytest
import torch

from dataset.dataset import Paired_Dataset, list_subject_slices, select_slice_range
from utils.errors import UserError
from utils.safe_pickle import load_pickle

VENDORS = ('SIEMENS', 'Philips')


def dump(path, obj, protocol=pickle.DEFAULT_PROTOCOL):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        pickle.dump(obj, f, protocol=protocol)


def pair(value_a=0.25, value_b=0.75, shape=(16, 12, 1)):
    return {VENDORS[0]: np.full(shape, value_a, np.float32), VENDORS[1]: np.full(shape, value_b, np.float32)}


def numeric_slices(subject_dir):
    """Slice files of a subject, ordered by number, computed here independently of the project."""
    names = [n for n in os.listdir(subject_dir) if re.fullmatch(r'slice_\d+\.pkl', n)]
    return [os.path.join(subject_dir, n) for n in sorted(names, key=lambda n: int(n[6:-4]))]


def small_dataset(root, subjects=1, slices=4, shape=(16, 12, 1), splits=('trainset', 'evalset')):
    rng = np.random.default_rng(0)
    for split in splits:
        for s in range(subjects):
            for k in range(slices):
                dump(os.path.join(root, split, f'subj_{s}', f'slice_{k}.pkl'),
                     {v: rng.random(shape, dtype=np.float32) for v in VENDORS})
    return str(root)


# ---- items -------------------------------------------------------------------------------------

@pytest.mark.parametrize('cache', [True, False])
@pytest.mark.parametrize('split', ['trainset', 'evalset'])
def test_items_are_the_right_pickles_mapped_to_minus_one_one(pickle_dataset, cache, split):
    lower, upper = 0.3, 0.6
    ds = Paired_Dataset(pickle_dataset, split=split, lower_bound=lower, upper_bound=upper, cache=cache, progress=False)
    split_dir = os.path.join(pickle_dataset, split)
    expected = []
    for subject in sorted(os.listdir(split_dir)):
        files = numeric_slices(os.path.join(split_dir, subject))
        n = len(files)
        expected += files[math.floor(n * lower):math.floor(n * upper)]
    assert len(ds) == len(expected) > 0
    assert [os.path.abspath(p) for p in ds.paths] == [os.path.abspath(p) for p in expected]
    for i in range(len(ds)):
        a, b = ds[i]
        with open(expected[i], 'rb') as f:
            raw = pickle.load(f)
        for tensor, vendor in ((a, 'SIEMENS'), (b, 'Philips')):
            assert isinstance(tensor, torch.Tensor)
            assert tensor.dtype == torch.float32
            assert tensor.shape == (1,) + raw[vendor].shape[:2]
            assert tensor.min() >= -1 and tensor.max() <= 1
            np.testing.assert_allclose(tensor.numpy()[0], 2 * raw[vendor][:, :, 0] - 1, atol=1e-6)
    # the two vendors really differ (a and b are not the same image)
    a, b = ds[len(ds) // 2]
    assert (a - b).abs().max() > 0.05


def test_dataset_image_size_and_loader_batches(pickle_dataset):
    ds = Paired_Dataset(pickle_dataset, split='evalset', lower_bound=0.4, upper_bound=0.6, progress=False)
    assert ds.image_size == ds[0][0].shape[1:]
    loader = torch.utils.data.DataLoader(ds, batch_size=3)
    a, b = next(iter(loader))
    assert a.shape == b.shape == (3, 1) + tuple(ds.image_size)


def test_vendor_keys_select_which_image_is_a(tmp_path):
    root = tmp_path / 'd'
    for k in range(3):
        dump(str(root / 'trainset' / 's' / f'slice_{k}.pkl'), {'GE': np.full((10, 10, 1), 0.0, np.float32),
                                                               'Canon': np.full((10, 10, 1), 1.0, np.float32)})
    ds = Paired_Dataset(str(root), vendor1='Canon', vendor2='GE', lower_bound=0, upper_bound=1, progress=False)
    a, b = ds[0]
    assert torch.all(a == 1) and torch.all(b == -1)


# ---- slice range in numeric order -------------------------------------------------------------

@pytest.mark.parametrize('n, lower, upper, expected', [
    (10, 0.1, 0.9, range(1, 9)),
    (11, 0.2, 0.8, range(2, 8)),
    (48, 0.3, 0.6, range(14, 28)),
    (49, 0.1, 0.9, range(4, 44)),
    (11, 0.0, 1.0, range(0, 11)),
    (5, 0.5, 0.6, range(2, 3)),
    (3, 0.1, 0.2, range(0, 0)),
    (0, 0.1, 0.9, range(0, 0)),
])
def test_select_slice_range_values(n, lower, upper, expected):
    assert list(select_slice_range(n, lower, upper)) == list(expected)


def numbered_subject(root, numbers, split='trainset', subject='subj_001'):
    """A subject whose slice_<k>.pkl holds the constant k/100 in both vendors (so an item tells its slice)."""
    folder = os.path.join(root, split, subject)
    for k in numbers:
        dump(os.path.join(folder, f'slice_{k}.pkl'), pair(k / 100, k / 100, (8, 8, 1)))
    return folder


@pytest.mark.parametrize('lower, upper', [(0.0, 1.0), (0.2, 0.8), (0.1, 0.5), (0.5, 1.0), (0.3, 0.4)])
def test_slices_are_kept_in_numeric_order(tmp_path, lower, upper):
    numbers = list(range(1, 12))  # slice_1 .. slice_11: lexical order would put slice_10, slice_11 after slice_1
    folder = numbered_subject(str(tmp_path), numbers)
    with open(os.path.join(folder, 'notes.txt'), 'w') as f:  # not a slice: ignored
        f.write('x')
    ds = Paired_Dataset(str(tmp_path), lower_bound=lower, upper_bound=upper, progress=False, cache=False)
    n = len(numbers)
    expected = numbers[math.floor(n * lower):math.floor(n * upper)]
    kept = [round(float(ds[i][0].mean() + 1) / 2 * 100) for i in range(len(ds))]
    assert kept == expected
    kept_b = [round(float(ds[i][1].mean() + 1) / 2 * 100) for i in range(len(ds))]
    assert kept_b == expected


def test_numeric_order_with_gaps_and_zero_padding(tmp_path):
    numbers = [3, 20, 100, 7, 9, 15, 2]
    folder = numbered_subject(str(tmp_path), numbers)
    # a zero-padded name sorts by its number too
    dump(os.path.join(folder, 'slice_011.pkl'), pair(0.11, 0.11, (8, 8, 1)))
    ordered = sorted(numbers + [11])
    assert [os.path.basename(p) for p in list_subject_slices(folder)] == [
        'slice_011.pkl' if k == 11 else f'slice_{k}.pkl' for k in ordered]
    ds = Paired_Dataset(str(tmp_path), lower_bound=0.25, upper_bound=0.75, progress=False)
    n = len(ordered)
    assert [round(float(ds[i][0].mean() + 1) * 50) for i in range(len(ds))] == \
        ordered[math.floor(n * 0.25):math.floor(n * 0.75)]


def test_range_is_applied_per_subject(tmp_path):
    numbered_subject(str(tmp_path), range(0, 10), subject='a')
    numbered_subject(str(tmp_path), range(50, 70), subject='b')
    ds = Paired_Dataset(str(tmp_path), lower_bound=0.2, upper_bound=0.6, progress=False)
    kept = [round(float(ds[i][0].mean() + 1) * 50) for i in range(len(ds))]
    assert kept == list(range(2, 6)) + list(range(54, 62))


# ---- the safe loader ----------------------------------------------------------------------------

class Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f'touch {self.target}',)


@pytest.mark.parametrize('wrap', ['bare', 'in_dict'])
def test_pickle_with_code_is_refused_and_not_run(tmp_path, wrap):
    marker = tmp_path / 'pwned'
    payload = Exploit(marker)
    obj = payload if wrap == 'bare' else {'SIEMENS': payload, 'Philips': np.zeros((8, 8, 1), np.float32)}
    path = tmp_path / 'data' / 'trainset' / 's' / 'slice_0.pkl'
    dump(str(path), obj)
    # the exploit is real: the standard unpickler would run it
    with pytest.raises(UserError) as info:
        load_pickle(str(path))
    assert str(path) in str(info.value)
    assert not marker.exists()
    with pytest.raises(UserError) as info:
        Paired_Dataset(str(tmp_path / 'data'), lower_bound=0, upper_bound=1, progress=False)
    assert str(path) in str(info.value)
    assert not marker.exists()
    # control: plain pickle.load would have executed the payload
    with open(path, 'rb') as f:
        pickle.load(f)
    assert marker.exists()


def test_pickle_with_other_callables_is_refused(tmp_path):
    import collections
    path = tmp_path / 'x.pkl'
    for obj in (collections.Counter('abc'), eval, {'SIEMENS': print}):
        dump(str(path), obj)
        with pytest.raises(UserError):
            load_pickle(str(path))


@pytest.mark.parametrize('protocol', [2, 3, 4, 5])
def test_plain_dict_of_arrays_loads_with_every_protocol(tmp_path, protocol):
    rng = np.random.default_rng(protocol)
    data = {
        'SIEMENS': rng.random((49, 58, 1), dtype=np.float32),
        'Philips': np.asfortranarray(rng.random((49, 58, 1))),  # float64, Fortran order
        'mask': (rng.random((5, 4)) > 0.5).astype(np.uint8),
        'ints': np.arange(6, dtype=np.int16).reshape(2, 3),
    }
    path = tmp_path / f'p{protocol}.pkl'
    dump(str(path), data, protocol=protocol)
    loaded = load_pickle(str(path))
    assert isinstance(loaded, dict) and set(loaded) == set(data)
    for key, value in data.items():
        assert loaded[key].dtype == value.dtype
        np.testing.assert_array_equal(loaded[key], value)


@pytest.mark.parametrize('protocol', [2, 5])
def test_dataset_reads_pickles_of_any_protocol(tmp_path, protocol):
    folder = tmp_path / 'trainset' / 's'
    for k in range(3):
        dump(str(folder / f'slice_{k}.pkl'), pair(0.5, 0.0, (10, 9, 1)), protocol=protocol)
    ds = Paired_Dataset(str(tmp_path), lower_bound=0, upper_bound=1, progress=False)
    a, b = ds[2]
    assert a.shape == (1, 10, 9)
    assert torch.all(a == 0) and torch.all(b == -1)


def test_corrupt_and_unreadable_pickles_are_user_errors(tmp_path):
    path = tmp_path / 'trunc.pkl'
    dump(str(path), pair())
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(UserError, match=re.escape(str(path))):
        load_pickle(str(path))
    with pytest.raises(UserError, match=re.escape(str(tmp_path / 'absent.pkl'))):
        load_pickle(str(tmp_path / 'absent.pkl'))


# ---- bad slices ---------------------------------------------------------------------------------

def bad_slice_cases():
    good = np.full((16, 12, 1), 0.5, np.float32)
    nan = good.copy()
    nan[3, 4, 0] = np.nan
    inf = good.copy()
    inf[0, 0, 0] = np.inf
    return {
        'missing_vendor': ({'SIEMENS': good}, 'Philips'),
        'other_vendor_names': ({'GE': good, 'Canon': good}, 'SIEMENS'),
        'not_a_dict': ([good, good], None),
        'three_channels': ({'SIEMENS': np.full((16, 12, 3), 0.5, np.float32), 'Philips': good}, None),
        'one_dimensional': ({'SIEMENS': np.full(16, 0.5, np.float32), 'Philips': good}, None),
        'four_dimensional': ({'SIEMENS': good[None], 'Philips': good}, None),
        'too_small': ({'SIEMENS': np.full((4, 4, 1), 0.5, np.float32), 'Philips': np.full((4, 4, 1), 0.5, np.float32)},
                      None),
        'vendors_differ_in_size': ({'SIEMENS': good, 'Philips': np.full((16, 13, 1), 0.5, np.float32)}, None),
        'nan': ({'SIEMENS': good, 'Philips': nan}, None),
        'inf': ({'SIEMENS': inf, 'Philips': good}, None),
        'above_one': ({'SIEMENS': good * 3, 'Philips': good}, None),
        'negative': ({'SIEMENS': good, 'Philips': good - 1}, None),
        'uint8_0_255': ({'SIEMENS': np.full((16, 12, 1), 200, np.uint8), 'Philips': good}, None),
        'string_array': ({'SIEMENS': np.full((16, 12, 1), 'a'), 'Philips': good}, None),
    }


@pytest.mark.parametrize('case', sorted(bad_slice_cases()))
@pytest.mark.parametrize('position', ['first', 'later'])
def test_bad_slice_raises_user_error_naming_the_file(tmp_path, case, position):
    obj, must_mention = bad_slice_cases()[case]
    folder = tmp_path / 'trainset' / 'subj'
    for k in range(4):
        dump(str(folder / f'slice_{k}.pkl'), pair())
    bad = folder / ('slice_0.pkl' if position == 'first' else 'slice_2.pkl')
    dump(str(bad), obj)
    with pytest.raises(UserError) as info:
        Paired_Dataset(str(tmp_path), lower_bound=0, upper_bound=1, progress=False)
    message = str(info.value)
    assert str(bad) in message
    if must_mention:
        assert must_mention in message
    assert '\n' not in message


def test_bad_slice_found_when_not_cached(tmp_path):
    folder = tmp_path / 'trainset' / 'subj'
    for k in range(3):
        dump(str(folder / f'slice_{k}.pkl'), pair())
    bad_obj = pair()
    bad_obj['Philips'][0, 0, 0] = np.nan
    dump(str(folder / 'slice_2.pkl'), bad_obj)
    ds = Paired_Dataset(str(tmp_path), lower_bound=0, upper_bound=1, progress=False, cache=False)
    ds[0]
    with pytest.raises(UserError, match=re.escape(str(folder / 'slice_2.pkl'))):
        ds[2]


def test_slices_of_different_sizes_are_refused(tmp_path):
    numbered_subject(str(tmp_path), range(3))
    dump(str(tmp_path / 'trainset' / 'subj_001' / 'slice_5.pkl'), pair(shape=(9, 9, 1)))
    with pytest.raises(UserError, match='slice_5.pkl'):
        Paired_Dataset(str(tmp_path), lower_bound=0, upper_bound=1, progress=False)


def test_values_within_rounding_of_the_range_are_clipped(tmp_path):
    folder = tmp_path / 'trainset' / 's'
    dump(str(folder / 'slice_0.pkl'), pair(1.0 + 1e-5, -1e-5))
    a, b = Paired_Dataset(str(tmp_path), lower_bound=0, upper_bound=1, progress=False)[0]
    assert a.max() <= 1 and b.min() >= -1


# ---- bad folders ----------------------------------------------------------------------------------

def test_missing_data_root(tmp_path):
    root = tmp_path / 'nowhere'
    with pytest.raises(UserError, match=re.escape(str(root))):
        Paired_Dataset(str(root), progress=False)


def test_missing_split(tmp_path):
    small_dataset(tmp_path, splits=('trainset',))
    Paired_Dataset(str(tmp_path), split='trainset', lower_bound=0, upper_bound=1, progress=False)
    with pytest.raises(UserError, match=re.escape(os.path.join(str(tmp_path), 'evalset'))):
        Paired_Dataset(str(tmp_path), split='evalset', progress=False)


@pytest.mark.parametrize('layout', ['no_subjects', 'empty_subject', 'only_other_files', 'range_keeps_nothing'])
def test_empty_split(tmp_path, layout):
    split = tmp_path / 'trainset'
    split.mkdir()
    lower, upper = 0.1, 0.9
    if layout == 'empty_subject':
        (split / 'subj_001').mkdir()
    elif layout == 'only_other_files':
        (split / 'subj_001').mkdir()
        (split / 'subj_001' / 'image.nii.gz').write_bytes(b'')
        dump(str(split / 'slice_0.pkl'), pair())  # a slice outside any subject folder
    elif layout == 'range_keeps_nothing':
        numbered_subject(str(tmp_path), [0, 1, 2])
        lower, upper = 0.1, 0.3  # floor(0.3) .. floor(0.9): nothing
    with pytest.raises(UserError, match=re.escape(str(split))):
        Paired_Dataset(str(tmp_path), lower_bound=lower, upper_bound=upper, progress=False)


def test_pickle_written_by_numpy_1_loads(tmp_path):
    """numpy 1.x names its reconstructor numpy.core.multiarray (numpy 2 writes numpy._core)."""
    data = {'SIEMENS': np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8, 1),
            'Philips': np.full((8, 8, 1), 0.5, np.float32)}
    raw = pickle.dumps(data, protocol=3)  # protocol 3 names globals as text, so they can be renamed in place
    if b'numpy._core' in raw:
        raw = raw.replace(b'numpy._core.multiarray', b'numpy.core.multiarray')
    assert b'numpy.core.multiarray' in raw
    path = tmp_path / 'np1.pkl'
    path.write_bytes(raw)
    loaded = load_pickle(str(path))
    for key, value in data.items():
        np.testing.assert_array_equal(loaded[key], value)
