"""Harmonize a folder of NIfTI volumes with a trained experiment: SIEMENS -> Philips (or the other way).

Either edit the constants below and run `python inference_nii.py`, or pass the same values as flags:

    python inference_nii.py --experiment MyExperiment --epoch best \
        --input_dir dataset/Harmonization_dataset/testset/SIEMENS \
        --output_dir results/MyExperiment/testset/SIEMENS_to_Philips \
        --src_vendor SIEMENS --trg_vendor Philips \
        --reference_dir dataset/Harmonization_dataset/testset/Philips \
        --target_dir dataset/scans/Philips

--reference_dir (the same subjects on the target vendor) and --target_dir (target-vendor scans of any subjects)
are optional: with either, each output is judged as evaluate.py judges it (metrics.csv and previews/).

From Python: `from inference_nii import main; main(data_dir, save_dir, src_vendor='SIEMENS', trg_vendor='Philips')`.

Each volume is brought to canonical orientation, resampled to the experiment's voxel spacing when the
dataset was made with --voxel_size, normalised as in dataset generation, its anatomy (utils/anatomy.py, or
--mask_dir) harmonized slice by slice in batches with the air set to 0 as in training, resampled back onto the
input's own grid, put into the target vendor's intensity scale (both recorded in the experiment's
dataset_info.json), returned to the input's own orientation and written as float32
`{stem}_harmonized.nii.gz` with the input's shape and affine. Outside the anatomy the output is the input's own
background, as dark relative to the tissue as it was.
"""
import argparse
import json
import math
import os
import sys
import warnings

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from utils.checkpoint import (generator_filename, load_arguments, load_generator_checkpoint, saved_generator_epochs,
                              vendor_tags)
from utils.cli import CliParser
from utils.cpu_memory import keep_freed_memory
from utils.device import AMP_CHOICES, amp_description, autocast, pick_device, resolve_amp
from utils.errors import UserError, run_cli
from utils.evaluation import TargetVendor, evaluate_volume, source_features, write_table
from utils.paths import check_writable_folder
from utils.anatomy import anatomy_on_grid, find_mask, reference_region, require_mask
from utils.volume import (anatomy_only, axial_slices, denormalise, find_by_stem, from_canonical, list_nifti,
                          load_volume, nifti_stem, normalise, resample_onto, resample_to_spacing, save_like,
                          stack_axial, to_canonical)

# ---- edit these (or pass the flags of the same meaning) -------------------------------------------
target_experiment = 'MyExperiment'            # a folder under save_root written by train.py
best_epochs = {'SIEMENS_to_Philips': 50,      # checkpoint epoch per direction: a number, 'best' or 'latest'
               'Philips_to_SIEMENS': 'best'}
save_root = './results'
batch_size = 16                               # slices per generator call
device = 'auto'                               # auto, cpu, cuda or mps
# ----------------------------------------------------------------------------------------------------

def load_generator(experiment_dir, src_vendor, trg_vendor, epoch, device):
    """The src->trg generator of an experiment, rebuilt from the configuration stored with it (older checkpoints:
    from the experiment's arguments.txt, which also names the vendors); returns (network, epoch used)."""
    if not os.path.isdir(experiment_dir):
        raise UserError(f'{experiment_dir}: no such experiment; check --experiment/--save_dir (or target_experiment)')
    arguments_path = os.path.join(experiment_dir, 'arguments.txt')
    arguments = load_arguments(arguments_path)
    if not isinstance(arguments, dict) or not {'vendor1', 'vendor2'} <= set(arguments):
        raise UserError(f'{arguments_path} lacks vendor1 and vendor2; it was not written by this train.py')
    vendors = (arguments['vendor1'], arguments['vendor2'])
    if src_vendor not in vendors or trg_vendor not in vendors or src_vendor == trg_vendor:
        raise UserError(f'{experiment_dir} was trained on {vendors[0]} and {vendors[1]}; '
                        f'--src_vendor {src_vendor} --trg_vendor {trg_vendor} must be those two, in either order')
    tags = vendor_tags(*vendors)
    model_dir = os.path.join(experiment_dir, 'model')
    saved = saved_generator_epochs(model_dir, tags, src_vendor, trg_vendor)
    if epoch == 'latest':
        if not saved:
            raise UserError(f'{model_dir}: no {src_vendor}->{trg_vendor} checkpoint yet; train the experiment first')
        epoch = saved[-1]
    elif epoch != 'best':
        epoch = int(epoch)
    path = os.path.join(model_dir, generator_filename(tags, src_vendor, trg_vendor, epoch))
    if not os.path.exists(path):
        raise UserError(f'{path} not found; saved epochs: {", ".join(map(str, saved)) or "none"}'
                        f'{" and best" if epoch != "best" and os.path.exists(path.replace(f"epoch_{epoch}", "best")) else ""}'
                        '; choose one with --epoch (or best_epochs)')
    if epoch == 'best':
        try:
            with open(os.path.join(model_dir, 'best.json')) as f:
                epoch = f'best (epoch {json.load(f)["A2B" if src_vendor == vendors[0] else "B2A"]["epoch"]})'
        except (OSError, ValueError, KeyError, TypeError):
            epoch = 'best'
    generator = load_generator_checkpoint(path, arguments, arguments_path)
    return generator.to(device).eval(), epoch


def target_scale(experiment_dir, trg_vendor):
    """The target vendor's typical robust maximum from dataset_info.json, or None (outputs stay in [0, 1])."""
    path = os.path.join(experiment_dir, 'dataset_info.json')
    try:
        with open(path) as f:
            return float(json.load(f)['intensity_scale'][trg_vendor])
    except (OSError, KeyError, ValueError, TypeError):
        warnings.warn(f'{path} has no intensity scale for {trg_vendor}: outputs stay in the normalised [0, 1] scale')
        return None


def training_spacing(experiment_dir):
    """The voxel size (three mm values) the experiment's dataset was resampled to, or None (no resampling)."""
    path = os.path.join(experiment_dir, 'dataset_info.json')
    try:
        with open(path) as f:
            spacing = json.load(f).get('voxel_size')
    except (OSError, ValueError, AttributeError):
        return None
    if spacing is None:
        return None
    if not (isinstance(spacing, list) and len(spacing) == 3 and
            all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in spacing)):
        raise UserError(f'{path}: voxel_size {spacing!r} is not three positive spacings in mm; copy the '
                        'dataset_info.json that generate_paired_dataset.py wrote into the experiment again')
    return tuple(float(v) for v in spacing)


@torch.inference_mode()
def harmonize_slices(generator, slices, batch_size, device, amp=False, progress=False):
    """(Z, H, W) slices in [0, 1] -> harmonized (Z, H, W) in [0, 1], batch by batch."""
    output = np.empty_like(slices)
    batches = range(0, len(slices), batch_size)
    for start in tqdm(batches, desc='slices', unit='batch', leave=False, disable=not progress):
        batch = torch.from_numpy(np.ascontiguousarray(slices[start:start + batch_size]))[:, None]
        with autocast(device, amp):
            fake = generator(batch.to(device) * 2 - 1)
        output[start:start + batch_size] = ((fake.float()[:, 0] + 1) / 2).clamp_(0, 1).cpu().numpy()
    return output


def harmonize_volume(generator, path, scale, batch_size, device, amp=False, voxel_size=None, mask_path=None):
    """Harmonize one NIfTI: returns (original image, output data in the input's orientation,
    canonical normalised input, canonical harmonized output in [0, 1]), all on the input's own grid.

    The anatomy (utils.anatomy: from mask_path where given, else found in the image) is normalised and harmonized
    as in training, with the air set to 0 as the networks saw it; outside the anatomy the output is the input's
    own background in the output's units (normalised by the input's robust maximum, scaled by the target's), so
    the air stays as dark, relative to the tissue, as it was. With voxel_size (the experiment's spacing) the
    generator sees the volume resampled to that spacing, as in training, and its output is resampled back onto
    the input's grid."""
    image = load_volume(path)
    canonical = to_canonical(image)
    resampled = resample_to_spacing(canonical, voxel_size) if voxel_size is not None else canonical
    if min(resampled.shape[:2]) < 8:
        raise UserError(f'{path}: axial slices of {resampled.shape[0]}x{resampled.shape[1]} voxels are too small '
                        'to harmonize (at least 8x8)')
    data = np.asarray(canonical.dataobj, dtype=np.float32)
    anatomy = anatomy_on_grid(canonical, path, mask_path=mask_path)
    resampled_data = np.asarray(resampled.dataobj, dtype=np.float32)
    resampled_anatomy = (anatomy if voxel_size is None
                         else anatomy_on_grid(canonical, path, resampled, resampled_data, mask_path))
    try:
        normalised, _ = normalise(data, region=reference_region(data, anatomy))
        model_input = (normalise(resampled_data, region=reference_region(resampled_data, resampled_anatomy))[0]
                       if voxel_size is not None else normalised)
    except ValueError:
        raise UserError(f'{path}: no positive voxels in its anatomy (an empty volume); nothing to harmonize') from None
    slices = axial_slices(anatomy_only(model_input, resampled_anatomy))
    fake = stack_axial(harmonize_slices(generator, slices, batch_size, device, amp, progress=len(slices) > 4 * batch_size))
    fake[~resampled_anatomy] = 0
    if voxel_size is not None:
        fake = np.clip(resample_onto(nib.Nifti1Image(fake, resampled.affine), canonical), 0, 1)
    fake = np.where(anatomy, fake, normalised)  # the air stays the input's air
    output = denormalise(fake, scale) if scale is not None else fake
    return image, from_canonical(output, image), normalised, fake


def main(data_dir, save_dir, src_vendor='SIEMENS', trg_vendor='Philips', experiment=None, epoch=None,
         results_root=None, reference_dir=None, batch_size=None, device=None, overwrite=False, amp='off',
         target_dir=None, mask_dir=None):
    """Harmonize every NIfTI in data_dir into save_dir; returns the list of volumes that failed. With reference_dir
    or target_dir, each new output is evaluated as evaluate.py does (metrics.csv and previews/ in save_dir). With
    mask_dir, each input's anatomy is its mask there (utils.anatomy.find_mask), else it is found in the image."""
    keep_freed_memory()
    experiment = experiment or target_experiment
    epoch = epoch if epoch is not None else best_epochs.get(f'{src_vendor}_to_{trg_vendor}', 'best')
    batch_size = batch_size or globals()['batch_size']
    experiment_dir = os.path.join(results_root or save_root, experiment)
    torch_device = pick_device(device or globals()['device'])
    amp = resolve_amp(amp, torch_device)
    if not os.path.isdir(data_dir):
        raise UserError(f'--input_dir {data_dir}: no such folder')
    inputs = list_nifti(data_dir)
    if not inputs:
        raise UserError(f'--input_dir {data_dir}: no .nii or .nii.gz files in it')
    if os.path.realpath(save_dir) == os.path.realpath(data_dir):
        raise UserError(f'--output_dir {save_dir} is the input folder; write the outputs to another folder')
    if reference_dir is not None and not os.path.isdir(reference_dir):
        raise UserError(f'--reference_dir {reference_dir}: no such folder')
    if mask_dir is not None and not os.path.isdir(mask_dir):
        raise UserError(f'--mask_dir {mask_dir}: no such folder')
    if mask_dir is not None:
        for path in inputs:  # every mask is there before anything is written
            require_mask(mask_dir, nifti_stem(path), path, src_vendor)
    generator, epoch_used = load_generator(experiment_dir, src_vendor, trg_vendor, epoch, torch_device)
    target = TargetVendor(target_dir, mask_dir=mask_dir, vendor=trg_vendor) if target_dir is not None else None
    sources = source_features(inputs, mask_dir, src_vendor) if target is not None else None
    scale = target_scale(experiment_dir, trg_vendor)
    voxel_size = training_spacing(experiment_dir)
    check_writable_folder(save_dir, '--output_dir')
    os.makedirs(save_dir, exist_ok=True)
    print(f'{experiment} {src_vendor}->{trg_vendor}, epoch {epoch_used}, on {torch_device} in '
          f'{amp_description(amp, torch_device)}: '
          f'{len(inputs)} volume(s) from {data_dir}')
    if voxel_size is not None:
        print(f'each volume is resampled to the training spacing {"x".join(f"{v:g}" for v in voxel_size)} mm, and '
              'its output back onto the input\'s grid')

    written, skipped, failed, rows = [], [], [], []
    for path in tqdm(inputs, desc='volumes', unit='volume'):
        stem = nifti_stem(path)
        output_path = os.path.join(save_dir, f'{stem}_harmonized.nii.gz')
        if os.path.exists(output_path) and not overwrite:
            skipped.append(output_path)
            continue
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter('always')
                mask_path = find_mask(mask_dir, stem, src_vendor) if mask_dir else None
                image, output, source, harmonized = harmonize_volume(generator, path, scale, batch_size,
                                                                     torch_device, amp, voxel_size, mask_path)
            for warning in caught:
                tqdm.write(f'warning: {warning.message}')
            save_like(output, image, output_path)
            written.append(output_path)
            reference_path = find_by_stem(reference_dir, stem) if reference_dir else None
            if reference_dir and reference_path is None:
                tqdm.write(f'warning: no reference {stem}.nii(.gz) in {reference_dir}; '
                           f'no metrics against it for {stem}')
            if reference_path or target is not None:
                rows += evaluate_volume(stem, output_path, target, source_path=path, reference_path=reference_path,
                                        mask_path=mask_path, sources=sources,
                                        figure_path=os.path.join(save_dir, 'previews', f'{stem}.png'))
        except UserError as error:
            failed.append(path)
            tqdm.write(f'failed: {error}')
        except OSError as error:  # disk full, permissions: this volume is lost, the others may still work
            failed.append(path)
            tqdm.write(f'failed: {path}: cannot write {output_path} ({error.strerror or error})')

    if rows:
        write_table(rows, save_dir)
        print(f'previews: {os.path.join(save_dir, "previews")}/')
    print(f'wrote {len(written)} volume(s) to {save_dir}'
          + (f'; {len(skipped)} existing output(s) kept (pass --overwrite to redo them)' if skipped else '')
          + (f'; {len(failed)} failed: {", ".join(failed)}' if failed else ''))
    return failed


def build_parser():
    parser = CliParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--experiment', default=target_experiment, help='experiment folder name under --save_dir')
    parser.add_argument('--epoch', default=None,
                        help='checkpoint: an epoch number, best (model/best.json: highest eval SSIM with eval pairs, '
                             'else lowest vendor distance) or latest; default from best_epochs')
    parser.add_argument('--src_vendor', default='SIEMENS', help='vendor of the input volumes')
    parser.add_argument('--trg_vendor', default='Philips', help='vendor to make them look like')
    parser.add_argument('--input_dir', help='folder of NIfTI volumes '
                                            '(default dataset/Harmonization_dataset/testset/SRC_VENDOR)')
    parser.add_argument('--output_dir', help='where {stem}_harmonized.nii.gz go '
                                             '(default SAVE_DIR/EXPERIMENT/testset/SRC_to_TRG)')
    parser.add_argument('--save_dir', default=save_root, help='results root holding the experiment folders')
    parser.add_argument('--reference_dir', help='target-vendor volumes with the same names: adds metrics.csv and previews')
    parser.add_argument('--target_dir', help='real target-vendor scans of any subjects: adds the vendor distance and '
                                             'the Nyul / histogram-matching baselines to metrics.csv (see evaluate.py)')
    parser.add_argument('--mask_dir', help='masks of the anatomy (non-zero inside), named after each input '
                                           '({stem}.nii.gz or {stem}_mask.nii.gz, in MASK_DIR/SRC_VENDOR/ or '
                                           'MASK_DIR/); without it the anatomy is found in each volume '
                                           '(utils/anatomy.py)')
    parser.add_argument('--batch_size', type=int, default=batch_size, help='slices per generator call')
    parser.add_argument('--device', choices=['auto', 'cpu', 'cuda', 'mps'], default=device)
    parser.add_argument('--amp', nargs='?', const='on', default='off', choices=AMP_CHOICES,
                        help='bfloat16/float16 autocast: "--amp" alone is "on" (an error on CPUs without bfloat16 '
                             'instructions, where it would be slow); "auto" uses it only where it is fast')
    parser.add_argument('--overwrite', action='store_true', help='redo volumes whose output already exists')
    parser.add_argument('--debug', action='store_true', help='show full tracebacks')
    return parser


def cli(argv):
    args = build_parser().parse_args(argv)
    if args.epoch not in (None, 'best', 'latest') and not str(args.epoch).isdigit():
        raise UserError(f'--epoch {args.epoch}: give an epoch number, best or latest')
    if args.batch_size < 1:
        raise UserError('--batch_size must be at least 1')
    input_dir = args.input_dir or os.path.join('dataset', 'Harmonization_dataset', 'testset', args.src_vendor)
    output_dir = args.output_dir or os.path.join(args.save_dir, args.experiment, 'testset',
                                                 f'{args.src_vendor}_to_{args.trg_vendor}')
    failed = main(input_dir, output_dir, args.src_vendor, args.trg_vendor, experiment=args.experiment,
                  epoch=args.epoch, results_root=args.save_dir, reference_dir=args.reference_dir,
                  batch_size=args.batch_size, device=args.device, overwrite=args.overwrite, amp=args.amp,
                  target_dir=args.target_dir, mask_dir=args.mask_dir)
    if failed:
        sys.exit(1)


if __name__ == '__main__':
    run_cli(cli)
