"""Volume handling shared by dataset generation and inference.

Loading and checking a NIfTI, bringing it to the closest canonical orientation (RAS, so the axial
axis is the last one), resampling to one voxel spacing and back onto an input's grid, the one
intensity normalisation and its inverse, cutting into and re-stacking axial slices, and writing a
result back in the input's own orientation.
"""
import gzip
import os
import re
import warnings
import zlib

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to, resample_to_output

from utils.errors import UserError

NIFTI_SUFFIXES = ('.nii.gz', '.nii')
ROBUST_PERCENTILE = 99.5
MAX_VOXELS = 2_000_000_000 // 4  # a 2 GB float32 volume is far beyond any MRI; larger headers are corrupt
RESAMPLE_ORDER = 1  # trilinear: no overshoot, so a zero background stays zero and no negative intensities appear
SPACING_TOLERANCE = 0.01  # relative; headers of one protocol differ in the last digits (0.9375 vs 0.93750006)


def nifti_stem(path):
    """'sub-01_T1w.nii.gz' -> 'sub-01_T1w'."""
    name = os.path.basename(path)
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


def natural_key(text):
    """'subj_10' sorts after 'subj_2'."""
    return [int(part) if part.isdigit() else part for part in re.split(r'(\d+)', text)]


def list_nifti(folder):
    """NIfTI files in `folder`, sorted by name (hidden files and temporary files skipped)."""
    return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                  if name.endswith(NIFTI_SUFFIXES) and not name.startswith('.'))


def find_by_stem(folder, stem, suffixes=('',)):
    """The NIfTI `{stem}{suffix}.nii(.gz)` in folder, first suffix first, or None."""
    for suffix in suffixes:
        for extension in ('.nii.gz', '.nii'):
            path = os.path.join(folder, stem + suffix + extension)
            if os.path.exists(path):
                return path
    return None


def one_line(error):
    """An exception's text folded onto one line."""
    return ' '.join(str(error).split()) or type(error).__name__


def check_gzip_stream(path, chunk=1 << 24):
    """Read a .gz file to its end so its checksum is verified: nibabel stops at the end of the voxel data,
    which lets a damaged stream through as garbage voxels."""
    try:
        with gzip.open(path, 'rb') as stream:
            while stream.read(chunk):
                pass
    except (OSError, EOFError, zlib.error) as error:
        raise UserError(f'{path}: damaged gzip stream ({one_line(error)}); the file is truncated or corrupt: '
                        'copy or export it again') from None


def load_volume(path):
    """Load a 3-D NIfTI as a float32 nibabel image, or raise UserError saying what is wrong with it.

    A 4-D file with a single volume is accepted; non-finite voxels are set to 0 with a warning.
    """
    if not os.path.isfile(path):
        raise UserError(f'{path}: file not found')
    if path.endswith('.gz'):
        check_gzip_stream(path)
    try:
        image = nib.load(path)
    except Exception as error:
        raise UserError(f'{path}: not a readable NIfTI file ({one_line(error)})') from None
    dtype = image.get_data_dtype()
    if dtype.kind == 'c':
        raise UserError(f'{path}: complex-valued data; convert it to a magnitude image first')
    if dtype.fields is not None or dtype.kind not in 'biuf':
        raise UserError(f'{path}: voxels of type {dtype} (RGB or another non-scalar type); a grey-scale volume is expected')
    shape = image.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise UserError(f'{path}: a {len(shape)}-D image of shape {image.shape}; a 3-D volume is expected '
                        '(split 4-D series into volumes first, e.g. with fslsplit)')
    if min(shape) < 1 or int(np.prod(shape, dtype=np.int64)) > MAX_VOXELS:
        raise UserError(f'{path}: implausible dimensions {shape} in the header; the file is corrupt')
    zooms = np.asarray(image.header.get_zooms()[:3], dtype=float)
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise UserError(f'{path}: invalid voxel size {tuple(zooms)} in the header; fix the header (pixdim)')
    if not np.all(np.isfinite(image.affine)) or abs(np.linalg.det(image.affine[:3, :3])) < 1e-12:
        raise UserError(f'{path}: the affine in the header is not invertible; fix the sform/qform')
    try:
        data = np.asarray(image.dataobj, dtype=np.float32).reshape(shape)
    except Exception as error:  # truncated gzip streams and short files end here
        raise UserError(f'{path}: cannot read the voxel data ({type(error).__name__}: {one_line(error)}); '
                        'the file is truncated or corrupt') from None
    bad = ~np.isfinite(data)
    if bad.any():
        warnings.warn(f'{path}: {int(bad.sum())} NaN/inf voxels set to 0')
        data[bad] = 0
    return nib.Nifti1Image(data, image.affine, image.header)


def to_canonical(image):
    """The image reoriented to the closest canonical (RAS+) orientation, so axial slices are data[:, :, k]."""
    return nib.as_closest_canonical(image)


def from_canonical(data, original):
    """Put `data`, laid out as to_canonical(original), back into `original`'s storage orientation."""
    transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt('RAS'),
                                                nib.orientations.io_orientation(original.affine))
    return nib.orientations.apply_orientation(data, transform)


def voxel_spacing(image):
    """The voxel size in mm along the image's three voxel axes."""
    return tuple(float(z) for z in image.header.get_zooms()[:3])


def resample_to_spacing(image, voxel_size):
    """A canonical image resampled to `voxel_size` (three mm values) over its whole field of view.

    The result is float32 and RAS+ (nibabel.processing.resample_to_output), so axial slices stay data[:, :, k].
    """
    resampled = resample_to_output(image, voxel_sizes=voxel_size, order=RESAMPLE_ORDER, mode='constant', cval=0.0)
    return nib.Nifti1Image(np.asarray(resampled.dataobj, dtype=np.float32), resampled.affine)


def resample_onto(image, grid):
    """`image`'s voxels resampled onto the grid (shape and affine) of the image `grid`, as float32 data."""
    resampled = resample_from_to(image, (grid.shape[:3], grid.affine), order=RESAMPLE_ORDER, mode='constant',
                                 cval=0.0)
    return np.asarray(resampled.dataobj, dtype=np.float32)


def check_same_spacing(spacings):
    """`spacings`: (path, voxel size) pairs; raise UserError naming a file whose voxel size differs from the
    most common one, and a file of that one."""
    def close(a, b):
        return np.allclose(a, b, rtol=SPACING_TOLERANCE, atol=0)
    reference_path, reference = max(spacings, key=lambda item: sum(close(item[1], other) for _, other in spacings))
    for path, spacing in spacings:
        if not close(spacing, reference):
            raise UserError(f'{path} has {"x".join(f"{v:g}" for v in spacing)} mm voxels but {reference_path} has '
                            f'{"x".join(f"{v:g}" for v in reference)} mm; pass --voxel_size MM to resample every '
                            'volume to one spacing')


def robust_max(data, region=None, percentile=ROBUST_PERCENTILE):
    """A high percentile of the positive voxels in `region` (utils.anatomy.reference_region; of the whole volume
    where none is given): a maximum that ignores a few hot voxels."""
    values = data[region] if region is not None else data
    values = values[values > 0]
    if values.size == 0:
        return 0.0
    return float(np.percentile(values, percentile))


def normalise(data, scale=None, region=None):
    """Divide by a robust maximum (of `region`, see robust_max) and clip to [0, 1]; returns (normalised float32
    data, scale used)."""
    scale = robust_max(data, region) if scale is None else scale
    if not scale > 0:
        raise ValueError('the volume has no positive voxels')
    return np.clip(data / scale, 0.0, 1.0).astype(np.float32), scale


def anatomy_only(unit, anatomy):
    """A normalised volume as the networks see it: 0 outside the anatomy (utils.anatomy), so that in training
    slices the anatomy is the voxels above the background (an anatomy voxel of exactly 0 is as dark as air)."""
    return np.where(anatomy, unit, 0).astype(np.float32)


def denormalise(data, scale):
    """Undo normalise() with a vendor's typical scale."""
    return (np.asarray(data, dtype=np.float32) * np.float32(scale)).astype(np.float32)


def axial_slices(canonical_data):
    """(X, Y, Z) canonical volume -> (Z, X, Y) stack of axial slices."""
    return np.moveaxis(canonical_data, 2, 0)


def stack_axial(slices):
    """Inverse of axial_slices: (Z, X, Y) -> (X, Y, Z)."""
    return np.moveaxis(np.asarray(slices), 0, 2)


def pad_or_crop(image, size, fill=0.0):
    """Centre-pad (with `fill`) or centre-crop a 2-D array to `size` (H, W)."""
    out = np.full(size, fill, dtype=image.dtype)
    src, dst = [], []
    for have, want in zip(image.shape, size):
        if have >= want:
            start = (have - want) // 2
            src.append(slice(start, start + want))
            dst.append(slice(0, want))
        else:
            start = (want - have) // 2
            src.append(slice(0, have))
            dst.append(slice(start, start + have))
    out[tuple(dst)] = image[tuple(src)]
    return out


def save_like(data, original, path):
    """Write float32 `data` (in `original`'s orientation) with its affine and a header describing the new data.

    The file is written under a temporary name and renamed, so an interrupted run leaves no
    truncated file that looks complete.
    """
    header = original.header.copy()
    header.set_data_dtype(np.float32)
    image = nib.Nifti1Image(np.asarray(data, dtype=np.float32), original.affine, header)
    image.header.set_slope_inter(1.0, 0.0)  # no stale scaling from the input
    image.header['cal_min'] = 0
    image.header['cal_max'] = 0
    image.set_qform(original.affine, code=int(original.header['qform_code']) or 1)
    image.set_sform(original.affine, code=int(original.header['sform_code']) or 1)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f'.{name}.partial.nii.gz' if name.endswith('.gz') else f'.{name}.partial.nii')
    try:
        nib.save(image, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
