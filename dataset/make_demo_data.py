"""Synthetic paired two-vendor T1w demo data built from the MNI152 template shipped with nilearn.

    python dataset/make_demo_data.py --output_dir demo/nifti [--subjects 12] [--voxel_size 2.0]
                                     [--background noise|zero] [--head] [--vendor1 SIEMENS] [--vendor2 Philips]
                                     [--seed 0] [--overwrite]

writes <output_dir>/<vendor1>/subj_001.nii.gz ... and <output_dir>/<vendor2>/subj_001.nii.gz ...:
the same synthetic "subject" scanned on two scanners, so the two files of one stem are a pair, and
<output_dir>/masks/<vendor>/subj_001.nii.gz: each scan's brain mask, stored as the scan is.
Nothing is downloaded: the T1 template and its grey / white matter maps are inside nilearn.

Anatomy.  Each subject is the 1 mm MNI152 (2009) template, its GM and WM probability maps and
its brain mask (template > 0.01; CSF = mask - GM - WM), pulled through a random smooth
deformation: a global similarity transform about the brain centre (scale 0.95-1.05 per axis,
rotation up to 4 deg per axis, shift up to 3 mm) plus a Gaussian-smoothed random displacement
field (sigma 10 mm, RMS 1.5-3 mm).  Both vendors of a subject share that deformation, so the
pair is voxel-aligned.  The maps are sampled once, straight from the 1 mm grid (anti-aliased),
onto a `--voxel_size` mm isotropic grid covering the template's field of view (99x117x95 at 2 mm).

Acquisition model (vendor1 / vendor2 are roles; --vendor1/--vendor2 only name the folders):

    ====================  ===================================  ===================================
    step                  vendor1 (e.g. SIEMENS, MPRAGE-like)  vendor2 (e.g. Philips, TFE-like)
    ====================  ===================================  ===================================
    tissue contrast       WM 1.00  GM 0.60  CSF 0.12            WM 1.00  GM 0.75  CSF 0.40
    template texture      1.0 x (template - tissue model)       0.2 x (template - tissue model)
    PSF (Gaussian FWHM)   1.2 mm isotropic                      2.0 x 2.0 mm in-plane, 3.2 mm S-I
    bias field (x signal) exp(linear + quadratic gradient      exp(-a r^2), centre bright,
                          along A-P and S-I), about +-10 %     a in 0.15-0.25, + weak random tilt
    noise                 Rician, sigma 3 % of WM              Rician, sigma 5 % of WM
    global scale          WM ~ 700 (values ~0-1000), +-5 %     WM ~ 2800 (values ~0-4000), +-5 %
    storage               int16, scl_slope 0.05, scl_inter 0   float32
    on-disk orientation   cycles RAS, LAS, SRA                 cycles LPS, RAS, SLP
    ====================  ===================================  ===================================

"template - tissue model" is what the T1 template holds beyond a linear mix of its tissue maps
(deep grey nuclei, WM tracts, cortical detail); giving it a different weight per vendor, together
with different GM/WM/CSF ratios (partial-volume voxels), different PSFs and independent bias
fields, makes the vendor2 image NOT a monotone function of the vendor1 image, so histogram
matching alone cannot harmonise the pair.

Scans as scanners write them (the default, --background noise): the magnitude image has Rician noise
everywhere, so the air outside the head is noise of the vendor's sigma, as inside.  --background zero
sets everything outside the brain mask to exactly 0 after the noise (a skull-stripped scan).
--head puts a head around the brain (the template is skull-stripped): shells at a distance d from the
brain mask, CSF/dura (d < 2 mm), inner table of the skull (2-4 mm, dark), marrow (4-7 mm, bright),
outer table (7-9 mm), muscle (9-12 mm), subcutaneous fat (12-16 mm, brighter than white matter on T1)
and skin (16-18 mm), with the vendor's level of each (bone, marrow, muscle, fat, skin in the table's
models); the grid then grows by 24 mm on every side but the bottom, so that there is air around it.  Orientations are applied
with nibabel's orientation tools, so after nibabel.as_closest_canonical the two files of a pair
have the same shape and affine.  Output is deterministic given --seed (subject i depends only on
the seed and i).
"""
import argparse
import math
import os
import sys
import time

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt, ornt_transform
from scipy import ndimage
from tqdm import tqdm

# Vendor acquisition models; see the table in the module docstring.
VENDOR_MODELS = (
    dict(wm=1.00, gm=0.60, csf=0.12, texture=1.0, bone=0.04, marrow=0.85, muscle=0.45, fat=1.30, skin=0.60,
         fwhm_mm=(1.2, 1.2, 1.2), noise=0.030, wm_level=700.0,
         dtype=np.int16, scl_slope=0.05,
         orientations=('RAS', 'LAS', 'SRA')),
    dict(wm=1.00, gm=0.75, csf=0.40, texture=0.20, bone=0.06, marrow=0.80, muscle=0.55, fat=1.15, skin=0.70,
         fwhm_mm=(2.0, 2.0, 3.2), noise=0.050, wm_level=2800.0,
         dtype=np.float32, scl_slope=None,
         orientations=('LPS', 'RAS', 'SLP')),
)
MIN_VOXEL_MM, MAX_VOXEL_MM = 1.0, 8.0
MASK_THRESHOLD = 0.01  # the shipped template is skull-stripped: anything above ~0 is brain
BACKGROUNDS = ('noise', 'zero')
# (tissue, outer distance from the brain mask in mm) of the head's shells, inside out
HEAD_LAYERS = (('csf', 2.0), ('bone', 4.0), ('marrow', 7.0), ('bone', 9.0), ('muscle', 12.0), ('fat', 16.0),
               ('skin', 18.0))
HEAD_MARGIN_MM = 24.0


class DemoDataError(ValueError):
    """Bad arguments or an output folder we refuse to touch; main() prints it as one line."""


def check_arguments(output_dir, subjects, voxel_size, vendor1, vendor2):
    """Raise DemoDataError for arguments that cannot give a usable paired data set."""
    if not isinstance(subjects, (int, np.integer)) or subjects < 2:
        raise DemoDataError(f'--subjects must be an integer >= 2 (got {subjects}); '
                            'a paired data set needs at least one training and one test subject')
    if not math.isfinite(voxel_size) or not MIN_VOXEL_MM <= voxel_size <= MAX_VOXEL_MM:
        why = ('the template is 1 mm, finer grids add no detail' if 0 < voxel_size < MIN_VOXEL_MM
               else 'it is an isotropic voxel size in mm')
        raise DemoDataError(f'--voxel_size must be between {MIN_VOXEL_MM:g} and {MAX_VOXEL_MM:g} mm '
                            f'(got {voxel_size:g}); {why}')
    for name in (vendor1, vendor2):
        if not name or name in ('.', '..', 'masks') or '/' in name or os.sep in name:
            raise DemoDataError(f'vendor name {name!r} is not a plain folder name other than "masks" (where the '
                                'brain masks go)')
    if vendor1 == vendor2:
        raise DemoDataError(f'--vendor1 and --vendor2 are both {vendor1!r}; give two different names')
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise DemoDataError(f'{output_dir} exists and is not a folder; choose another --output_dir')


def check_output_folder(output_dir, overwrite):
    """Refuse a non-empty output folder unless overwrite is set."""
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise DemoDataError(f'{output_dir} is not empty; pass --overwrite to replace its demo volumes '
                            'or choose an empty --output_dir')


def remove_stale_volumes(vendor_dirs):
    """Delete earlier subj_*.nii.gz so a rerun with fewer subjects leaves no unpaired files."""
    for folder in vendor_dirs:
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if name.startswith('subj_') and name.endswith('.nii.gz'):
                    os.remove(os.path.join(folder, name))


def load_template():
    """1 mm T1 template, GM, WM and brain mask as float32 arrays, plus their affine."""
    from nilearn import datasets  # slow import; only needed once arguments are known to be fine
    t1_img = datasets.load_mni152_template(resolution=1)
    maps = dict(t1=t1_img.get_fdata(dtype=np.float32),
                gm=datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32),
                wm=datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32))
    maps['mask'] = (maps['t1'] > MASK_THRESHOLD).astype(np.float32)
    return maps, t1_img.affine


def output_grid(template_shape, template_affine, voxel_size, margin_mm=0.0):
    """Shape and RAS affine of the voxel_size grid over the template's field of view, grown by margin_mm on
    every side but the bottom (the template's field of view ends in the brain stem)."""
    template_zooms = np.abs(np.diag(template_affine)[:3])
    extent = (np.asarray(template_shape) - 1) * template_zooms + np.array([2, 2, 1]) * margin_mm
    shape = tuple(int(n) for n in np.floor(extent / voxel_size + 1e-6).astype(int) + 1)
    affine = np.diag([voxel_size, voxel_size, voxel_size, 1.0])
    affine[:3, 3] = template_affine[:3, 3] - np.array([margin_mm, margin_mm, 0.0])
    return shape, affine


def antialias(maps, voxel_size):
    """Pre-smooth the 1 mm maps so sampling them at voxel_size does not alias."""
    if voxel_size <= 1.0:
        return maps
    sigma = math.sqrt(voxel_size ** 2 - 1.0) / 2.3548
    return {key: ndimage.gaussian_filter(value, sigma) for key, value in maps.items()}


def texture_coefficients(maps):
    """Least-squares GM/WM/CSF levels of the template, so texture = template - tissue mix."""
    inside = maps['mask'] > 0.5
    gm, wm = maps['gm'][inside], maps['wm'][inside]
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    design = np.stack([gm, wm, csf], axis=1)
    coefs, *_ = np.linalg.lstsq(design, maps['t1'][inside], rcond=None)
    return coefs


def rotation_matrix(angles):
    """Rotation about x, then y, then z (radians)."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def subject_anatomy(maps, template_affine, brain_centre, shape, affine, rng, head=False):
    """One subject's T1 / GM / WM / CSF / mask on the output grid, via a random smooth warp; with head, the
    fractions of each head shell (head_<tissue>) around the warped brain mask too."""
    voxel_size = affine[0, 0]
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1)
    world = affine[:3, :3] @ grid + affine[:3, 3:4]

    # Pull-back: output point x came from template point c + (RS)^-1 (x - c - t) + u(x).
    scale = np.diag(rng.uniform(0.95, 1.05, 3))
    rotation = rotation_matrix(np.deg2rad(rng.uniform(-4, 4, 3)))
    shift = rng.uniform(-3, 3, 3)[:, None]
    centre = brain_centre[:, None]
    source = np.linalg.inv(rotation @ scale) @ (world - centre - shift) + centre

    sigma = 10.0 / voxel_size
    rms = rng.uniform(1.5, 3.0)
    for axis in range(3):
        field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode='reflect')
        source[axis] += (rms / max(field.std(), 1e-8)) * field.ravel()

    index = np.linalg.inv(template_affine) @ np.vstack([source, np.ones((1, source.shape[1]))])

    def sample(key):
        return ndimage.map_coordinates(maps[key], index[:3], order=1, mode='constant', cval=0.0).reshape(shape)

    soft_mask = np.clip(sample('mask'), 0.0, 1.0)
    mask = ndimage.binary_fill_holes(soft_mask > 0.5)
    gm = np.clip(sample('gm'), 0.0, 1.0)
    wm = np.clip(sample('wm'), 0.0, 1.0)
    total = gm + wm
    over = total > 1.0
    gm[over] /= total[over]
    wm[over] /= total[over]
    csf = np.clip(soft_mask - gm - wm, 0.0, 1.0)
    anatomy = dict(t1=sample('t1'), gm=gm, wm=wm, csf=csf, mask=mask)
    if head:
        # Shell fractions from the distance to the brain's soft edge, a voxel-wide ramp at each border so that
        # the PSF, not the grid, decides how sharp the layers look.
        distance = ndimage.distance_transform_edt(soft_mask < 0.5, sampling=voxel_size)
        inner = 0.0
        for tissue, outer in HEAD_LAYERS:
            share = (np.clip((distance - inner) / voxel_size + 0.5, 0, 1)
                     * np.clip((outer - distance) / voxel_size + 0.5, 0, 1)) * (1.0 - soft_mask)
            anatomy[f'head_{tissue}'] = anatomy.get(f'head_{tissue}', 0.0) + share.astype(np.float32)
            inner = outer
    return anatomy


def bias_field(vendor_index, shape, affine, brain_centre, rng):
    """Smooth multiplicative receive field, vendor-specific in shape, random per subject."""
    grid = np.indices(shape, dtype=np.float32)
    coords = [(affine[a, a] * grid[a] + affine[a, 3] - brain_centre[a]) / 80.0 for a in range(3)]
    x, y, z = coords  # R-L, A-P, S-I, about -1..1 over the brain
    if vendor_index == 0:
        # Head-array receive profile: gradients mostly along A-P and S-I (random sign per subject).
        c = rng.normal(0.0, [0.03, 0.07, 0.07, 0.04, 0.04, 0.03])
        log_field = c[0] * x + c[1] * y + c[2] * z + c[3] * y * z + c[4] * y ** 2 + c[5] * z ** 2
    else:
        # High-field dielectric effect: a bright centre, plus a slight random tilt.
        a = rng.uniform(0.15, 0.25)
        c = rng.normal(0.0, 0.04, 3)
        log_field = -a * (x ** 2 + y ** 2 + z ** 2) + c[0] * x + c[1] * y + c[2] * z
    return np.exp(log_field)


def acquire(anatomy, vendor_index, texture_coefs, affine, brain_centre, rng, background='noise'):
    """Vendor image (float32) of one subject: contrast, PSF, bias, Rician noise, (zero background), scale."""
    model = VENDOR_MODELS[vendor_index]
    a_gm, a_wm, a_csf = texture_coefs
    texture = (anatomy['t1'] - (a_gm * anatomy['gm'] + a_wm * anatomy['wm'] + a_csf * anatomy['csf'])) / a_wm
    signal = (model['gm'] * anatomy['gm'] + model['wm'] * anatomy['wm'] + model['csf'] * anatomy['csf']
              + model['texture'] * texture * anatomy['mask'])
    for key, share in anatomy.items():
        if key.startswith('head_'):
            tissue = key[len('head_'):]
            signal = signal + model[tissue] * share
    signal = np.clip(signal, 0.0, None)

    voxel_size = affine[0, 0]
    sigma = [fwhm / 2.3548 / voxel_size for fwhm in model['fwhm_mm']]
    signal = ndimage.gaussian_filter(signal, sigma, mode='constant')
    signal *= bias_field(vendor_index, signal.shape, affine, brain_centre, rng)

    # Magnitude of a complex signal with Gaussian noise in both channels: Rician.
    noise = model['noise']
    real = signal + noise * rng.standard_normal(signal.shape)
    imag = noise * rng.standard_normal(signal.shape)
    image = np.sqrt(real ** 2 + imag ** 2)

    if background == 'zero':
        image *= anatomy['mask']  # after the noise, so the background is exactly zero (a skull-stripped scan)
    gain = model['wm_level'] * rng.uniform(0.95, 1.05)  # scanner auto-scaling
    return (image * gain).astype(np.float32)


def to_nifti(image, vendor_index, subject_index, vendor_name, affine):
    """NIfTI in the vendor's storage dtype and this subject's on-disk orientation."""
    model = VENDOR_MODELS[vendor_index]
    if model['dtype'] == np.int16:
        slope = model['scl_slope']
        raw = np.clip(np.rint(image / slope), 0, np.iinfo(np.int16).max).astype(np.int16)
        img = nib.Nifti1Image(raw, affine)
    else:
        img = nib.Nifti1Image(image.astype(model['dtype']), affine)
    codes = model['orientations'][subject_index % len(model['orientations'])]
    img = img.as_reoriented(ornt_transform(axcodes2ornt('RAS'), axcodes2ornt(codes)))
    if model['scl_slope'] is not None:
        img.header.set_slope_inter(model['scl_slope'], 0.0)  # after as_reoriented, which resets it
    img.set_qform(img.affine, code='scanner')
    img.set_sform(img.affine, code='scanner')
    img.header.set_xyzt_units('mm')
    img.header['descrip'] = f'synthetic T1w demo, {vendor_name}'.encode()[:79]
    return img


def mask_nifti(mask, vendor_index, subject_index, affine):
    """A brain mask (uint8) stored in the same on-disk orientation as that vendor's scan of the subject."""
    codes = VENDOR_MODELS[vendor_index]['orientations'][subject_index % len(VENDOR_MODELS[vendor_index]['orientations'])]
    img = nib.Nifti1Image(mask.astype(np.uint8), affine)
    img = img.as_reoriented(ornt_transform(axcodes2ornt('RAS'), axcodes2ornt(codes)))
    img.set_qform(img.affine, code='scanner')
    img.set_sform(img.affine, code='scanner')
    return img


def save_scan(scan, mask, folder, mask_dir, name):
    """Write a scan to folder/name and its brain mask to mask_dir/name; returns the scan's path."""
    path = os.path.join(folder, name)
    nib.save(scan, path)
    nib.save(mask, os.path.join(mask_dir, name))
    return path


def make_demo_data(output_dir, subjects=12, voxel_size=2.0, vendor1='SIEMENS', vendor2='Philips', seed=0,
                   overwrite=False, background='noise', head=False):
    """Write the paired demo volumes and their brain masks; return the volumes' paths (vendor1's, then
    vendor2's)."""
    check_arguments(output_dir, subjects, voxel_size, vendor1, vendor2)
    if background not in BACKGROUNDS:
        raise DemoDataError(f'--background {background}: choose one of {", ".join(BACKGROUNDS)}')
    if head and background == 'zero':
        raise DemoDataError('--head with --background zero: a zero background is a skull-stripped scan, which has no '
                            'head around the brain; leave out one of them')
    check_output_folder(output_dir, overwrite)
    vendor_dirs = [os.path.join(output_dir, vendor1), os.path.join(output_dir, vendor2)]
    mask_dirs = [os.path.join(output_dir, 'masks', vendor1), os.path.join(output_dir, 'masks', vendor2)]

    maps, template_affine = load_template()
    shape, affine = output_grid(maps['t1'].shape, template_affine, voxel_size, HEAD_MARGIN_MM if head else 0.0)
    texture_coefs = texture_coefficients(maps)
    inside = np.argwhere(maps['mask'] > 0.5).mean(axis=0)
    brain_centre = (template_affine @ np.append(inside, 1.0))[:3]
    maps = antialias(maps, voxel_size)

    remove_stale_volumes(vendor_dirs + mask_dirs)
    for folder in vendor_dirs + mask_dirs:
        os.makedirs(folder, exist_ok=True)

    width = max(3, len(str(subjects)))
    paths = [[], []]
    for subject in tqdm(range(subjects), desc='subjects', unit='subj'):
        # One stream per subject, so subject i is the same whatever --subjects is.
        anatomy_rng, *vendor_rngs = [np.random.default_rng(s) for s in
                                     np.random.SeedSequence([seed, subject]).spawn(3)]
        anatomy = subject_anatomy(maps, template_affine, brain_centre, shape, affine, anatomy_rng, head)
        for v, (folder, mask_dir, name) in enumerate(zip(vendor_dirs, mask_dirs, (vendor1, vendor2))):
            image = acquire(anatomy, v, texture_coefs, affine, brain_centre, vendor_rngs[v], background)
            paths[v].append(save_scan(to_nifti(image, v, subject, name, affine),
                                      mask_nifti(anatomy['mask'], v, subject, affine), folder, mask_dir,
                                      f'subj_{subject + 1:0{width}d}.nii.gz'))
    return paths[0] + paths[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Synthetic paired two-vendor T1w NIfTI volumes from the '
                                                 'MNI152 template (no download).')
    parser.add_argument('--output_dir', required=True, help='folder to create <vendor>/subj_NNN.nii.gz in')
    parser.add_argument('--subjects', type=int, default=12, help='number of paired subjects (>= 2)')
    parser.add_argument('--voxel_size', type=float, default=2.0, help='isotropic voxel size in mm')
    parser.add_argument('--vendor1', default='SIEMENS', help='folder name of the first vendor')
    parser.add_argument('--vendor2', default='Philips', help='folder name of the second vendor')
    parser.add_argument('--background', default='noise', choices=BACKGROUNDS,
                        help='noise: Rician noise in the air, as a scanner writes a magnitude image; zero: every '
                             'voxel outside the brain set to 0 (a skull-stripped scan)')
    parser.add_argument('--head', action='store_true',
                        help='put skull, marrow, muscle, fat and skin around the brain (an unstripped head)')
    parser.add_argument('--seed', type=int, default=0, help='random seed (same seed, same volumes)')
    parser.add_argument('--overwrite', action='store_true',
                        help='write into a non-empty output folder (replaces its subj_*.nii.gz)')
    return parser.parse_args(argv)


def report_written(args, paths, start):
    """Say what was written where, and how long it took."""
    shape = nib.as_closest_canonical(nib.load(paths[0])).shape
    size_mb = sum(os.path.getsize(p) for p in paths) / 1024 ** 2
    print(f'{args.subjects} paired subjects ({args.vendor1}, {args.vendor2}), '
          f'{shape[0]}x{shape[1]}x{shape[2]} voxels of {args.voxel_size:g} mm (RAS), '
          f'{len(paths)} files, {size_mb:.1f} MB, {time.time() - start:.1f} s')
    print(f'written to {os.path.abspath(args.output_dir)}/{{{args.vendor1},{args.vendor2}}}/subj_*.nii.gz '
          f'(brain masks in masks/{{{args.vendor1},{args.vendor2}}}/)')


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    try:
        paths = make_demo_data(args.output_dir, args.subjects, args.voxel_size, args.vendor1, args.vendor2,
                               args.seed, overwrite=args.overwrite, background=args.background, head=args.head)
    except DemoDataError as error:
        print(f'make_demo_data.py: error: {error}', file=sys.stderr)
        sys.exit(2)
    report_written(args, paths, start)


if __name__ == '__main__':
    main()
