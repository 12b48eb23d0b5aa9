"""A second vendor shift, made by other means than the demo data's, to check a recipe on data it was not tuned on.

    python experiments/second_shift.py --input_dir demo/nifti/SIEMENS --output_dir /tmp/shift2
    python experiments/quality.py --minutes 10 --data_dir /tmp/shift2 @recipes/cpu.args

Copies each volume of --input_dir to OUTPUT/SIEMENS and writes OUTPUT/Philips/<same name>: the same scan as
another scanner might give it. Where dataset/make_demo_data.py models each vendor's tissue contrast, point
spread, bias field and noise from the template's tissue maps, this maps the first vendor's scan itself:
intensities (as a fraction of the scan's 99.5th percentile) through a gamma curve, a Gaussian blur, a smooth
centre-bright bias field, a little Gaussian noise and a 4x intensity scale, inside the anatomy (utils/anatomy.py);
the air outside it stays the input's (zero stays zero, noise stays noise), on the same scale.
So the target is nearly a function of the input: a paired model can come close to it (PSNR near 30 dB),
unlike the demo's Philips scans, whose own noise caps every method's SSIM near 0.85.
"""
import argparse
import os
import shutil

import nibabel as nib
import numpy as np
from scipy import ndimage

from utils.errors import UserError, run_cli
from utils.paths import check_writable_folder
from utils.anatomy import anatomy_mask, reference_region
from utils.volume import list_nifti, load_volume, robust_max

GAMMA = 1.5
BLUR_SIGMA_VOXELS = 0.65  # FWHM about 1.5 voxels
BIAS = 0.08  # the field is 1 + BIAS at the volume's centre and falls to about 1 - BIAS at its corners
NOISE = 0.01  # of the scan's 99.5th percentile, before the scale
SCALE = 4000.0


def shifted(data, rng, path='the volume'):
    """The second vendor's view of one scan (float array): the anatomy shifted, the air as it was."""
    foreground = anatomy_mask(data, path)
    unit = np.clip(data / robust_max(data, reference_region(data, foreground)), 0, None)
    out = ndimage.gaussian_filter(unit ** GAMMA, BLUR_SIGMA_VOXELS)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in data.shape], indexing='ij')
    out *= 1 + BIAS * (1 - 2 * sum(g ** 2 for g in grid) / len(grid))
    out += rng.normal(0, NOISE, data.shape)
    out[~foreground] = unit[~foreground]
    return (SCALE * np.clip(out, 0, None)).astype(np.float32)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--input_dir', required=True, help='folder of NIfTI volumes of the first vendor')
    parser.add_argument('--output_dir', required=True, help='folder to create SIEMENS/ and Philips/ in')
    parser.add_argument('--seed', type=int, default=0, help='seed of the noise')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing --output_dir')
    args = parser.parse_args(argv)
    sources = list_nifti(args.input_dir) if os.path.isdir(args.input_dir) else []
    if not sources:
        raise UserError(f'{args.input_dir}: no .nii or .nii.gz volumes; give the first vendor\'s folder of a '
                        'paired data set, e.g. demo/nifti/SIEMENS')
    check_writable_folder(args.output_dir, '--output_dir')
    if os.path.exists(args.output_dir):
        if not args.overwrite:
            raise UserError(f'{args.output_dir} exists; pass --overwrite to replace it, or another --output_dir')
        if not os.path.isdir(args.output_dir) or set(os.listdir(args.output_dir)) - {'SIEMENS', 'Philips'}:
            raise UserError(f'{args.output_dir} holds more than this script writes (SIEMENS/ and Philips/); '
                            '--overwrite only replaces an earlier output: choose another --output_dir')
        shutil.rmtree(args.output_dir)
    rng = np.random.default_rng(args.seed)
    for vendor in ('SIEMENS', 'Philips'):
        os.makedirs(os.path.join(args.output_dir, vendor))
    for source in sources:
        name = os.path.basename(source)
        image = load_volume(source)
        target = nib.Nifti1Image(shifted(np.asarray(image.dataobj, dtype=np.float64), rng), image.affine)
        target.set_qform(image.affine, code=1)
        target.set_sform(image.affine, code=1)
        shutil.copyfile(source, os.path.join(args.output_dir, 'SIEMENS', name))
        nib.save(target, os.path.join(args.output_dir, 'Philips', name))
    print(f'wrote {len(sources)} pairs to {args.output_dir}/SIEMENS and {args.output_dir}/Philips')


if __name__ == '__main__':
    run_cli(main)
