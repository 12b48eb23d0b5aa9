"""Shared test data: small real MRI (the MNI152 T1 template shipped in nilearn) and a second "vendor" made from it.

The second vendor here is built by other means than dataset/make_demo_data.py (a gamma curve, a blur and
another intensity scale), so tests do not only check the project against its own demo generator.
"""
import os
import pickle
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


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
