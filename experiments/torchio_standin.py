"""A stand-in two-vendor benchmark made with other tools than dataset/make_demo_data.py: TorchIO and nibabel.

    python experiments/torchio_standin.py --output_dir /tmp/standin [--subjects 16] [--voxel_size 2.0]
                                          [--vendor1 SIEMENS] [--vendor2 Philips] [--seed 0] [--overwrite]

writes the same layout as the demo generator, so every script that reads the demo data reads this too:
<output_dir>/<vendor1>/subj_001.nii.gz ... and <output_dir>/<vendor2>/subj_001.nii.gz ...: the same subject on
both scanners (a voxel-aligned pair on one grid), and <output_dir>/masks/<vendor>/subj_001.nii.gz: each scan's
brain mask (uint8), stored in that scan's orientation.  Nothing is downloaded: the anatomy is nilearn's 1 mm
MNI152 (2009) T1 template, its GM / WM probability maps and its brain mask, all shipped inside nilearn.

Anatomy.  The four maps go into one torchio.Subject (the mask as a LabelMap, so it is moved with nearest
neighbour interpolation) that is cropped to the brain plus 16 mm of air on each side, then pulled through
TorchIO's RandomAffine (scale 0.95-1.05, rotation up to 4 deg, shift up to 3 mm per axis) and
RandomElasticDeformation (7 control points per axis, up to 4 mm), both at 1 mm and identical for all four
maps, and then Resample(--voxel_size, antialias=True) onto the isotropic output grid.  Both vendors of a subject
share it.

Acquisition model (vendor1 / vendor2 are roles; --vendor1/--vendor2 only name the folders).  The signal is the
warped T1 template itself, scaled so that white matter is 1; the tissue maps only locate white matter to set
the noise and the global scale:

    ======================  ======================================  ======================================
    step (TorchIO unless    vendor1 (e.g. SIEMENS)                  vendor2 (e.g. Philips)
    said)
    ======================  ======================================  ======================================
    contrast                RandomGamma, log_gamma 0.25-0.35        RandomGamma, log_gamma -0.25 to -0.15
                            (darker GM / CSF)                       (flatter GM / WM contrast)
    resolution              sharp, no blur                          RandomBlur, std 1.0-1.5 mm
    shading                 RandomBiasField(0.5, order 3): strong   RandomBiasField(0.2, order 3): milder,
                            3rd-order polynomial in the log         an independent draw
    artefact                none                                    RandomGhosting: 2-4 weak ghosts along
                                                                    A-P (intensity 0.15-0.3)
    noise (numpy)           Rician over the whole field of view,    Rician, sigma 5 % of WM
                            sigma 3 % of WM
    global scale            WM ~ 700 (values ~0-1000+), +-10 %      WM ~ 2400 (values ~0-3000+), +-10 %
    storage                 int16 with scl_slope (0.1, larger if    float32
                            the bias field needs it)
    on-disk orientation     cycles LAS, RAS                         cycles LPS, PIL
    ======================  ======================================  ======================================

How it differs from make_demo_data.py: that generator builds each vendor's contrast from tissue-class levels
(WM / GM / CSF ratios plus a weighted template texture), blurs with a Gaussian PSF in voxels, multiplies by an
exp-quadratic bias field of its own design and samples the anatomy with its own numpy / scipy warp.  Here the
anatomy is warped by TorchIO (SimpleITK B-splines), the contrast change is a gamma curve of the real T1 image,
the shading is TorchIO's polynomial bias field (much stronger for vendor1), vendor2 has k-space ghosting, and
the orientations and intensity scales differ.  Gamma alone would be monotone, but the independent bias fields,
the blur and ghosts of vendor2 only and the noise make vendor2 NOT a monotone function of vendor1, so
histogram matching alone cannot harmonise a pair.

Scans as scanners write them: the magnitude image sqrt((s + n1)^2 + n2^2) has Rician noise everywhere, so the
air outside the head is noise, not zero; the brain mask is written separately.  Orientations are applied with
nibabel's as_reoriented, so after nibabel.as_closest_canonical the two files of a pair have the same shape and
affine.  Output is deterministic given --seed: subject i depends only on (seed, i), each vendor's effects only
on (seed, i, vendor), through torch.manual_seed and numpy generators.
"""
import argparse
import os
import sys
import time
import warnings

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt, ornt_transform
from tqdm import tqdm

from dataset.make_demo_data import (DemoDataError, check_arguments, check_output_folder, remove_stale_volumes,
                                    report_written, save_scan)

# Vendor acquisition models; see the table in the module docstring.
VENDOR_MODELS = (
    dict(log_gamma=(0.25, 0.35), blur_std_mm=None, bias_coefficients=0.5, ghosting=None,
         noise=0.03, wm_level=700.0, dtype=np.int16, scl_slope=0.1, orientations=('LAS', 'RAS')),
    dict(log_gamma=(-0.25, -0.15), blur_std_mm=(1.0, 1.5), bias_coefficients=0.2,
         ghosting=dict(num_ghosts=(2, 4), axes=(1,), intensity=(0.15, 0.3)),  # axis 1 of the RAS grid is A-P
         noise=0.05, wm_level=2400.0, dtype=np.float32, scl_slope=None, orientations=('LPS', 'PIL')),
)
CROP_MARGIN_MM = 16  # air kept around the template's brain mask (the template is 1 mm)
WM_THRESHOLD = 0.8   # voxels with at least this WM probability define the white matter level
INT16_MAX = np.iinfo(np.int16).max


def load_template():
    """nilearn's 1 mm MNI152 T1, GM, WM and brain mask, cropped to the brain plus CROP_MARGIN_MM of air."""
    from nilearn import datasets  # slow import; only needed once arguments are known to be fine
    images = dict(t1=datasets.load_mni152_template(resolution=1),
                  gm=datasets.load_mni152_gm_template(resolution=1),
                  wm=datasets.load_mni152_wm_template(resolution=1),
                  mask=datasets.load_mni152_brain_mask(resolution=1))
    reference = images['t1']
    for key, img in images.items():
        if img.shape != reference.shape or not np.allclose(img.affine, reference.affine):
            raise RuntimeError(f'nilearn MNI152 {key} is not on the T1 template grid')
    inside = np.argwhere(np.asarray(images['mask'].dataobj) > 0)
    low = np.maximum(inside.min(axis=0) - CROP_MARGIN_MM, 0)
    high = np.minimum(inside.max(axis=0) + 1 + CROP_MARGIN_MM, reference.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
    return {key: img.slicer[box] for key, img in images.items()}


def template_subject(template):
    """The template maps as one torchio.Subject; the brain mask as a LabelMap."""
    import torch
    import torchio as tio

    def tensor(img, dtype):
        return torch.from_numpy(np.asarray(img.get_fdata(), dtype=dtype)[None].copy())

    affine = template['t1'].affine
    t1 = tensor(template['t1'], np.float32)
    t1 = t1 / t1[tensor(template['wm'], np.float32) >= WM_THRESHOLD].median()  # white matter = 1
    return tio.Subject(
        t1=tio.ScalarImage(tensor=t1, affine=affine),
        gm=tio.ScalarImage(tensor=tensor(template['gm'], np.float32), affine=affine),
        wm=tio.ScalarImage(tensor=tensor(template['wm'], np.float32), affine=affine),
        mask=tio.LabelMap(tensor=tensor(template['mask'], np.uint8), affine=affine))


def subject_anatomy(subject, voxel_size, seed):
    """One subject's warped T1 / GM / WM / mask on the voxel_size grid, as numpy arrays plus the RAS affine."""
    import torch
    import torchio as tio
    torch.manual_seed(seed)
    warp = tio.Compose([
        tio.RandomAffine(scales=(0.95, 1.05), degrees=4, translation=3, default_pad_value=0.0),
        tio.RandomElasticDeformation(num_control_points=7, max_displacement=4.0),
        tio.Resample(voxel_size, antialias=True),
    ])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        warped = warp(subject)
    anatomy = {key: warped[key].data[0].numpy() for key in ('t1', 'gm', 'wm')}
    anatomy['t1'] = np.clip(anatomy['t1'], 0.0, None)
    anatomy['mask'] = warped['mask'].data[0].numpy() > 0
    return anatomy, np.asarray(warped['t1'].affine, dtype=np.float64)


def acquire(anatomy, affine, vendor_index, torch_seed, rng):
    """Vendor image (float32) of one subject: gamma, (blur), bias field, (ghosting), Rician noise, scale."""
    import torch
    import torchio as tio
    model = VENDOR_MODELS[vendor_index]
    steps = [tio.RandomGamma(log_gamma=model['log_gamma'])]
    if model['blur_std_mm'] is not None:
        steps.append(tio.RandomBlur(std=model['blur_std_mm']))
    steps.append(tio.RandomBiasField(coefficients=model['bias_coefficients'], order=3))
    if model['ghosting'] is not None:
        steps.append(tio.RandomGhosting(**model['ghosting']))
    torch.manual_seed(torch_seed)
    image = tio.ScalarImage(tensor=torch.from_numpy(anatomy['t1'][None].astype(np.float32)), affine=affine)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        signal = tio.Compose(steps)(image).data[0].numpy().astype(np.float64)
    signal = np.clip(signal, 0.0, None)

    white = (anatomy['wm'] >= WM_THRESHOLD) & anatomy['mask']
    if white.sum() < 20:  # very coarse grids: fall back to the brightest tenth of the brain
        white = anatomy['mask'] & (signal >= np.percentile(signal[anatomy['mask']], 90))
    wm_level = float(np.median(signal[white]))

    # Magnitude of a complex signal with Gaussian noise in both channels (Rician), over the whole field of view.
    sigma = model['noise'] * wm_level
    real = signal + sigma * rng.standard_normal(signal.shape)
    imag = sigma * rng.standard_normal(signal.shape)
    image = np.sqrt(real ** 2 + imag ** 2)

    gain = model['wm_level'] * rng.uniform(0.9, 1.1) / wm_level  # scanner auto-scaling
    return (image * gain).astype(np.float32)


def reorient(img, codes):
    """img (RAS) stored in the axis codes' orientation, with scanner-coded qform / sform."""
    img = img.as_reoriented(ornt_transform(axcodes2ornt('RAS'), axcodes2ornt(codes)))
    img.set_qform(img.affine, code='scanner')
    img.set_sform(img.affine, code='scanner')
    img.header.set_xyzt_units('mm')
    return img


def to_nifti(image, vendor_index, subject_index, vendor_name, affine):
    """NIfTI in the vendor's storage dtype and this subject's on-disk orientation."""
    model = VENDOR_MODELS[vendor_index]
    codes = model['orientations'][subject_index % len(model['orientations'])]
    slope = None
    if model['dtype'] == np.int16:
        slope = model['scl_slope']
        if image.max() / slope > INT16_MAX:  # a strong bias field: coarser steps rather than clipping
            slope = float(np.ceil(image.max() / INT16_MAX * 1000.0) / 1000.0)
        raw = np.clip(np.rint(image / slope), 0, INT16_MAX).astype(np.int16)
        img = reorient(nib.Nifti1Image(raw, affine), codes)
        img.header.set_slope_inter(slope, 0.0)  # after as_reoriented, which resets it
    else:
        img = reorient(nib.Nifti1Image(image.astype(model['dtype']), affine), codes)
    img.header['descrip'] = f'torchio stand-in T1w, {vendor_name}'.encode()[:79]
    return img


def mask_nifti(mask, vendor_index, subject_index, affine):
    """A brain mask (uint8) stored in the same on-disk orientation as that vendor's scan of the subject."""
    orientations = VENDOR_MODELS[vendor_index]['orientations']
    return reorient(nib.Nifti1Image(mask.astype(np.uint8), affine), orientations[subject_index % len(orientations)])


def make_standin_data(output_dir, subjects=16, voxel_size=2.0, vendor1='SIEMENS', vendor2='Philips', seed=0,
                      overwrite=False):
    """Write the paired volumes and their brain masks; return the volumes' paths (vendor1's, then vendor2's)."""
    check_arguments(output_dir, subjects, voxel_size, vendor1, vendor2)
    check_output_folder(output_dir, overwrite)
    vendor_dirs = [os.path.join(output_dir, vendor1), os.path.join(output_dir, vendor2)]
    mask_dirs = [os.path.join(output_dir, 'masks', vendor1), os.path.join(output_dir, 'masks', vendor2)]

    template = template_subject(load_template())
    remove_stale_volumes(vendor_dirs + mask_dirs)
    for folder in vendor_dirs + mask_dirs:
        os.makedirs(folder, exist_ok=True)

    width = max(3, len(str(subjects)))
    paths = [[], []]
    for subject in tqdm(range(subjects), desc='subjects', unit='subj'):
        # One seed stream per subject (and per vendor), so subject i is the same whatever --subjects is.
        anatomy_seq, *vendor_seqs = np.random.SeedSequence([seed, subject]).spawn(3)
        anatomy, affine = subject_anatomy(template, voxel_size, int(anatomy_seq.generate_state(1)[0]))
        for v, (folder, mask_dir, name) in enumerate(zip(vendor_dirs, mask_dirs, (vendor1, vendor2))):
            torch_seq, noise_seq = vendor_seqs[v].spawn(2)
            image = acquire(anatomy, affine, v, int(torch_seq.generate_state(1)[0]), np.random.default_rng(noise_seq))
            paths[v].append(save_scan(to_nifti(image, v, subject, name, affine),
                                      mask_nifti(anatomy['mask'], v, subject, affine), folder, mask_dir,
                                      f'subj_{subject + 1:0{width}d}.nii.gz'))
    return paths[0] + paths[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Stand-in paired two-vendor T1w NIfTI volumes: the MNI152 '
                                                 'template warped and "scanned" with TorchIO transforms (no '
                                                 'download).')
    parser.add_argument('--output_dir', required=True, help='folder to create <vendor>/subj_NNN.nii.gz in')
    parser.add_argument('--subjects', type=int, default=16, help='number of paired subjects (>= 2)')
    parser.add_argument('--voxel_size', type=float, default=2.0, help='isotropic voxel size in mm')
    parser.add_argument('--vendor1', default='SIEMENS', help='folder name of the first vendor')
    parser.add_argument('--vendor2', default='Philips', help='folder name of the second vendor')
    parser.add_argument('--seed', type=int, default=0, help='random seed (same seed, same volumes)')
    parser.add_argument('--overwrite', action='store_true',
                        help='write into a non-empty output folder (replaces its subj_*.nii.gz)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    try:
        paths = make_standin_data(args.output_dir, args.subjects, args.voxel_size, args.vendor1, args.vendor2,
                                  args.seed, overwrite=args.overwrite)
    except DemoDataError as error:
        print(f'torchio_standin.py: error: {error}', file=sys.stderr)
        sys.exit(2)
    report_written(args, paths, start)


if __name__ == '__main__':
    main()
