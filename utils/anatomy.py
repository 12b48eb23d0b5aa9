"""Which voxels are the anatomy: the one foreground definition of every step.

Dataset generation, inference and evaluation all take the anatomy from here, and nowhere else:

- **anatomy_mask**: the voxels of the head (or of the brain in a skull-stripped scan), not the air around it.
  A scan whose background is exactly zero (skull-stripped, or masked by the scanner or a tool) keeps the rule it
  always had: the anatomy is the non-zero voxels. A scan as a scanner writes it has noise in the air (a magnitude
  image: Rician, small but non-zero everywhere): the noise level is read off the volume's border, voxels well
  above it that connect to clearly bright tissue are kept (hysteresis thresholding, skimage), and the largest
  connected part with its holes filled is the head, so dark tissue inside it (CSF, bone) stays in.
- **reference_region**: the voxels whose intensities set the normalisation's robust maximum. In an unstripped T1
  the scalp's fat and the skull's marrow are brighter than white matter, so a percentile of the whole head would
  land on fat; the brain is found as the largest bright part left once the dark ring of CSF and skull is cut
  (a morphological skull strip), and used instead. Where no such ring cuts a smaller brain off from much bright tissue
  around it (a skull-stripped scan) the region is the whole anatomy.
- **read_mask**: a user's mask (non-zero = anatomy) for a scan, checked against it.

In the slices written for training (and in what inference gives the networks) every voxel outside the anatomy
is exactly 0, so the networks, the intensity curve and the distribution term read the anatomy as the voxels
above the background.
"""
import os

import nibabel as nib
import numpy as np
from scipy import ndimage
from skimage.filters import apply_hysteresis_threshold, threshold_multiotsu, threshold_otsu

from utils.errors import UserError

ZERO_BACKGROUND_SHARE = 0.05  # of the volume exactly 0 and connected to its edge: the air has been set to zero
NOISE_MULTIPLE = 2.5  # times the air's median (Rayleigh: ~2.9 sigma): noise rarely reaches it, dark tissue does
MIN_CONTRAST = 3.0  # median anatomy over median air below this: the anatomy cannot be told from the noise
MIN_SHARE, MAX_SHARE = 0.001, 0.98  # of the field of view: a head between these, else none was found
BRAIN_SHARE = 0.85  # a brain found inside the anatomy smaller than this share of it means a head around it
HEAD_TISSUE_SHARE = 0.2  # ... with at least this share of the bright tissue outside it (the scalp)
MASK_SUFFIXES = ('', '_mask', '_brainmask', '_brain_mask')
SAMPLE = 2_000_000  # voxels for the Otsu thresholds: enough for a stable histogram of any volume


class MaskError(UserError):
    """A user's mask that is missing or does not fit its scan: theirs to fix, never a scan to skip."""


def _border(data):
    """The voxels on the four in-plane faces of an axial stack (X, Y, Z) (the four edges of a 2-D slice): air in a
    head scan, where the bottom face may be the neck and a stack of a few slices is all anatomy at its ends."""
    faces = []
    for axis in range(2):
        faces += [np.take(data, 0, axis=axis).ravel(), np.take(data, -1, axis=axis).ravel()]
    return np.concatenate(faces)


def _sample(values):
    return values[::max(1, values.size // SAMPLE)]


def has_zero_background(data):
    """True when the air was set to exactly 0 (a skull-stripped or masked scan): at least ZERO_BACKGROUND_SHARE of
    the volume is exact zeros connected to its in-plane edge. The zeros that rounding leaves in the noise of an
    integer image are scattered voxels, far too sparse to connect into such a region."""
    zeros = np.asarray(data) == 0
    if zeros.mean() < ZERO_BACKGROUND_SHARE:
        return False
    labels, _ = ndimage.label(zeros)
    edge = np.unique(_border(labels))
    return float(np.isin(labels, edge[edge > 0]).mean()) >= ZERO_BACKGROUND_SHARE


def _largest_component(mask):
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


def anatomy_mask(data, path='the volume'):
    """Boolean mask of the anatomy's voxels of a 3-D (or 2-D) scan (see the module docstring).

    Raises UserError naming `path` for a volume without positive voxels, or one whose background is so noisy
    that no head stands out of it (give a mask then).
    """
    data = np.asarray(data, dtype=np.float32)
    if not (data > 0).any():
        raise UserError(f'{path}: no positive voxels (an all-zero volume); remove it or export it again')
    if has_zero_background(data):
        return data > 0
    air = float(np.median(_border(data)))
    low = NOISE_MULTIPLE * air
    high = threshold_otsu(_sample(data[data > low]).astype(np.float64)) if (data > low).any() else low
    mask = apply_hysteresis_threshold(data, low, max(high, low))
    if mask.any():
        mask = ndimage.binary_fill_holes(_largest_component(mask))
        # holes open to the top or bottom of the field of view (the neck's airways, a cut brain stem) in each slice
        for index in range(mask.shape[-1]):
            mask[..., index] = ndimage.binary_fill_holes(mask[..., index])
    share = float(mask.mean())
    inside = float(np.median(data[mask])) if mask.any() else 0.0
    if not MIN_SHARE <= share <= MAX_SHARE or inside < MIN_CONTRAST * max(air, 1e-12):
        raise UserError(f'{path}: no head stands out of the background noise (air {air:.3g}, anatomy '
                        f'{inside:.3g}, {100 * share:.1f}% of the field of view); give its brain or head mask '
                        'with --mask_dir')
    return mask


def reference_region(data, anatomy):
    """The anatomy's voxels whose intensities set the robust maximum: the brain where a head surrounds it,
    otherwise the whole anatomy (see the module docstring)."""
    values = np.asarray(data, dtype=np.float32)[anatomy]
    if values.size < 100 or data.ndim != 3:
        return anatomy
    try:
        dark = threshold_multiotsu(_sample(values).astype(np.float64), classes=3)[0]
    except ValueError:
        return anatomy
    tissue = anatomy & (data > dark)
    core = ndimage.binary_erosion(tissue, iterations=1)  # cuts thin bridges between the brain and the scalp
    if not core.any():
        return anatomy
    brain = ndimage.binary_dilation(_largest_component(core), iterations=2) & anatomy
    brain = ndimage.binary_fill_holes(brain)
    around = np.count_nonzero(tissue & ~brain)  # bright tissue cut off from the brain: scalp, muscle, marrow
    if around < HEAD_TISSUE_SHARE * np.count_nonzero(tissue) or brain.sum() >= BRAIN_SHARE * anatomy.sum():
        return anatomy
    return brain


def find_mask(mask_dir, stem, vendor=None):
    """The mask file of the scan `stem` in mask_dir (mask_dir/<vendor>/ first where a vendor is given), named
    `{stem}` or `{stem}_mask` (also `_brainmask`, `_brain_mask`), .nii.gz or .nii; None where there is none."""
    from utils.volume import find_by_stem  # volume.py imports this module
    folders = ([os.path.join(mask_dir, vendor)] if vendor else []) + [mask_dir]
    return next((path for path in (find_by_stem(folder, stem, MASK_SUFFIXES) for folder in folders) if path), None)


def require_mask(mask_dir, stem, scan_path, vendor=None, flag='--mask_dir'):
    """find_mask, or UserError naming the scan and where its mask was looked for."""
    path = find_mask(mask_dir, stem, vendor)
    if path is None:
        where = f'{mask_dir}/{vendor}/ or {mask_dir}/' if vendor else f'{mask_dir}/'
        raise MaskError(f'{scan_path}: no mask {stem}.nii.gz (or {stem}_mask.nii.gz) in {where}; add its mask '
                        f'or leave out {flag}')
    return path


def anatomy_on_grid(image, path, grid=None, grid_data=None, mask_path=None):
    """The anatomy of the scan `image` (canonical) read from `path`, on the grid (shape and affine) of the image
    `grid`, where the scan's voxels are `grid_data` (the scan's own grid where None): its mask at mask_path, else
    found in the scan (anatomy_mask). It is found on the scan's own grid
    and carried onto another one by nearest neighbour, since resampling pads the field of view with zeros that
    would read as a zero background; a zero-background scan keeps, on any grid, the rule it always had (the
    non-zero voxels, a user's mask included only where they are non-zero)."""
    data = np.asarray(image.dataobj, dtype=np.float32)
    zero_background = has_zero_background(data)
    grid_data = data if grid is None else np.asarray(grid_data, dtype=np.float32)
    if mask_path:
        mask = read_mask(mask_path, image, path)
        mask = mask if grid is None else resample_mask(mask, image, grid)
        return mask & (grid_data > 0) if zero_background else mask
    if zero_background:
        return anatomy_mask(grid_data, path)
    mask = anatomy_mask(data, path)
    return mask if grid is None else resample_mask(mask, image, grid)


def read_mask(mask_path, canonical_image, scan_path):
    """The boolean mask in `mask_path` (non-zero = anatomy) for the scan `canonical_image` (already in canonical
    orientation), on its grid; UserError naming the file for another grid, an empty mask or a full one."""
    from utils.volume import load_volume, to_canonical  # volume.py imports this module
    try:
        mask_image = to_canonical(load_volume(mask_path))
    except UserError as error:
        raise MaskError(str(error)) from None
    voxel = float(np.min(canonical_image.header.get_zooms()[:3]))
    if mask_image.shape != canonical_image.shape or not np.allclose(mask_image.affine, canonical_image.affine,
                                                                    atol=1e-3 * max(voxel, 1.0)):
        raise MaskError(f'{mask_path}: grid {mask_image.shape} differs from its scan {scan_path} '
                        f'{canonical_image.shape} (shape or affine, after reorientation); give the mask on the '
                        'scan\'s own grid')
    mask = np.asarray(mask_image.dataobj) != 0
    if not mask.any():
        raise MaskError(f'{mask_path}: an empty mask (no non-zero voxel); give the anatomy\'s mask of {scan_path}')
    if mask.all():
        raise MaskError(f'{mask_path}: the mask covers the whole volume, air included; give a mask of the anatomy '
                        f'of {scan_path} (non-zero inside the head or brain, zero in the air)')
    return mask


def resample_mask(mask, image, grid):
    """A boolean mask on `image`'s grid carried onto the grid (shape and affine) of the image `grid` (nearest
    neighbour, so it stays a mask)."""
    from nibabel.processing import resample_from_to
    moved = resample_from_to(nib.Nifti1Image(mask.astype(np.uint8), image.affine), (grid.shape[:3], grid.affine),
                             order=0, mode='constant', cval=0)
    return np.asarray(moved.dataobj) > 0
