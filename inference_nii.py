"""Harmonize a folder of NIfTI volumes with a trained experiment: SIEMENS -> Philips (or the other way).

Either edit the constants below and run `python inference_nii.py`, or pass the same values as flags:

    python inference_nii.py --experiment MyExperiment --epoch best \
        --input_dir dataset/Harmonization_dataset/testset/SIEMENS \
        --output_dir results/MyExperiment/testset/SIEMENS_to_Philips \
        --src_vendor SIEMENS --trg_vendor Philips \
        --reference_dir dataset/Harmonization_dataset/testset/Philips   # optional: metrics and previews

From Python: `from inference_nii import main; main(data_dir, save_dir, src_vendor='SIEMENS', trg_vendor='Philips')`.

Each volume is brought to canonical orientation, normalised as in dataset generation, harmonized
slice by slice in batches, put into the target vendor's intensity scale (recorded in the experiment's
dataset_info.json), returned to the input's own orientation and written as float32
`{stem}_harmonized.nii.gz` with the input's affine.
"""
import argparse
import json
import os
import sys
import warnings

import numpy as np
import pandas as pd
import torch
from skimage.exposure import match_histograms
from tqdm import tqdm

from model.generator import Generator
from utils.arguments import load_arguments
from utils.cli import CliParser
from utils.checkpoint import generator_filename, load_weights, saved_generator_epochs, vendor_tags
from utils.cpu_memory import keep_freed_memory
from utils.device import AMP_CHOICES, amp_description, autocast, pick_device, resolve_amp
from utils.errors import UserError, run_cli
from utils.paths import check_writable_folder
from utils.metrics import fine_detail, volume_metrics
from utils.volume import (axial_slices, denormalise, from_canonical, list_nifti, load_volume, nifti_stem,
                          normalise, save_like, stack_axial, to_canonical)

# ---- edit these (or pass the flags of the same meaning) -------------------------------------------
target_experiment = 'MyExperiment'            # a folder under save_root written by train.py
best_epochs = {'SIEMENS_to_Philips': 50,      # checkpoint epoch per direction: a number, 'best' or 'latest'
               'Philips_to_SIEMENS': 'best'}
save_root = './results'
batch_size = 16                               # slices per generator call
device = 'auto'                               # auto, cpu, cuda or mps
# ----------------------------------------------------------------------------------------------------

METHODS = ('harmonized', 'unharmonized', 'histogram matching')


def load_generator(experiment_dir, src_vendor, trg_vendor, epoch, device):
    """The src->trg generator of an experiment, rebuilt from its arguments.txt; returns (network, epoch used)."""
    if not os.path.isdir(experiment_dir):
        raise UserError(f'{experiment_dir}: no such experiment; check --experiment/--save_dir (or target_experiment)')
    arguments_path = os.path.join(experiment_dir, 'arguments.txt')
    arguments = load_arguments(arguments_path)
    needed = ('vendor1', 'vendor2', 'ngf', 'n_res_blocks')
    if not isinstance(arguments, dict) or not all(key in arguments for key in needed):
        raise UserError(f'{arguments_path} lacks {", ".join(needed)}; it was not written by this train.py')
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
    generator = Generator(ngf=arguments['ngf'], n_res_blocks=arguments['n_res_blocks'],
                          input_skip=arguments.get('input_skip', False))
    load_weights(path, generator)
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


def harmonize_volume(generator, path, scale, batch_size, device, amp=False):
    """Harmonize one NIfTI: returns (original image, output data in the input's orientation,
    canonical normalised input, canonical harmonized output in [0, 1])."""
    image = load_volume(path)
    canonical = to_canonical(image)
    if min(canonical.shape[:2]) < 8:
        raise UserError(f'{path}: axial slices of {canonical.shape[0]}x{canonical.shape[1]} voxels are too small '
                        'to harmonize (at least 8x8)')
    data = np.asarray(canonical.dataobj, dtype=np.float32)
    try:
        normalised, _ = normalise(data)
    except ValueError:
        raise UserError(f'{path}: no positive voxels (an empty volume); nothing to harmonize') from None
    slices = axial_slices(normalised)
    fake = stack_axial(harmonize_slices(generator, slices, batch_size, device, amp, progress=len(slices) > 4 * batch_size))
    fake[data <= 0] = 0  # the background stays background
    output = denormalise(fake, scale) if scale is not None else fake
    return image, from_canonical(output, image), normalised, fake


def find_reference(reference_dir, stem):
    for suffix in ('.nii.gz', '.nii'):
        path = os.path.join(reference_dir, stem + suffix)
        if os.path.exists(path):
            return path
    return None


def compare_with_reference(stem, source, harmonized, reference_path):
    """Metrics of harmonized / unharmonized / histogram-matched volumes against the reference, in [0, 1], and
    their fine detail as a ratio to the reference's."""
    reference = np.asarray(to_canonical(load_volume(reference_path)).dataobj, dtype=np.float32)
    if reference.shape != source.shape:
        raise UserError(f'{reference_path}: shape {reference.shape} differs from the input\'s {source.shape} '
                        '(after reorientation); the reference must be on the same grid')
    reference, _ = normalise(reference)
    mask = (reference > 0) | (source > 0)
    matched = np.zeros_like(source)
    matched[mask] = match_histograms(source[mask], reference[mask])
    volumes = {'harmonized': harmonized, 'unharmonized': source, 'histogram matching': matched}
    reference_detail = fine_detail(reference, mask)
    rows = [{'volume': stem, 'method': method, **volume_metrics(volume, reference, mask),
             'Detail': fine_detail(volume, mask) / reference_detail if reference_detail > 0 else float('nan')}
            for method, volume in volumes.items()]
    return rows, reference, matched


def save_preview(path, source, harmonized, reference, title):
    """Input, harmonized, reference and |harmonized - reference| through the middle of the volume, three views."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    centre = [s // 2 for s in source.shape]
    views = {'axial': lambda v: v[:, :, centre[2]].T, 'coronal': lambda v: v[:, centre[1], :].T,
             'sagittal': lambda v: v[centre[0], :, :].T}
    columns = {'input': source, 'harmonized': harmonized, 'reference': reference,
               '|harmonized - reference|': np.abs(harmonized - reference)}
    fig, axes = plt.subplots(3, 4, figsize=(10, 8))
    for row, (view, cut) in enumerate(views.items()):
        for col, (name, volume) in enumerate(columns.items()):
            ax = axes[row, col]
            ax.imshow(cut(volume), cmap='magma' if col == 3 else 'gray', vmin=0, vmax=0.5 if col == 3 else 1,
                      origin='lower')
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=10)
            if col == 0:
                ax.set_ylabel(view)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=60)
    plt.close(fig)


def print_metrics_table(table):
    summary = table.groupby('method', sort=False)[['SSIM', 'PSNR', 'MAE', 'Detail']].mean()
    print('\nagainst the reference, inside the foreground (intensities normalised to [0, 1]; Detail: fine texture '
          'and noise as a ratio to the reference\'s):')
    print(table.to_string(index=False, float_format=lambda v: f'{v:.4f}'))
    print('\nmean over volumes:')
    print(summary.to_string(float_format=lambda v: f'{v:.4f}'))
    return summary


def main(data_dir, save_dir, src_vendor='SIEMENS', trg_vendor='Philips', experiment=None, epoch=None,
         results_root=None, reference_dir=None, batch_size=None, device=None, overwrite=False, amp='off'):
    """Harmonize every NIfTI in data_dir into save_dir; returns the list of volumes that failed."""
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
    generator, epoch_used = load_generator(experiment_dir, src_vendor, trg_vendor, epoch, torch_device)
    scale = target_scale(experiment_dir, trg_vendor)
    check_writable_folder(save_dir, '--output_dir')
    os.makedirs(save_dir, exist_ok=True)
    print(f'{experiment} {src_vendor}->{trg_vendor}, epoch {epoch_used}, on {torch_device} in '
          f'{amp_description(amp, torch_device)}: '
          f'{len(inputs)} volume(s) from {data_dir}')

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
                image, output, source, harmonized = harmonize_volume(generator, path, scale, batch_size,
                                                                     torch_device, amp)
            for warning in caught:
                tqdm.write(f'warning: {warning.message}')
            save_like(output, image, output_path)
            written.append(output_path)
            reference_path = find_reference(reference_dir, stem) if reference_dir else None
            if reference_dir and reference_path is None:
                tqdm.write(f'warning: no reference {stem}.nii(.gz) in {reference_dir}; no metrics for {stem}')
            if reference_path:
                volume_rows, reference, _ = compare_with_reference(stem, source, harmonized, reference_path)
                rows += volume_rows
                save_preview(os.path.join(save_dir, 'previews', f'{stem}.png'), source, harmonized, reference,
                             f'{stem}: {src_vendor} -> {trg_vendor}')
        except UserError as error:
            failed.append(path)
            tqdm.write(f'failed: {error}')
        except OSError as error:  # disk full, permissions: this volume is lost, the others may still work
            failed.append(path)
            tqdm.write(f'failed: {path}: cannot write {output_path} ({error.strerror or error})')

    if rows:
        table = pd.DataFrame(rows)
        table.to_csv(os.path.join(save_dir, 'metrics.csv'), index=False, float_format='%.6g')
        print_metrics_table(table)
        print(f'metrics: {os.path.join(save_dir, "metrics.csv")}; previews: {os.path.join(save_dir, "previews")}/')
    print(f'wrote {len(written)} volume(s) to {save_dir}'
          + (f'; {len(skipped)} existing output(s) kept (pass --overwrite to redo them)' if skipped else '')
          + (f'; {len(failed)} failed: {", ".join(failed)}' if failed else ''))
    return failed


def build_parser():
    parser = CliParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--experiment', default=target_experiment, help='experiment folder name under --save_dir')
    parser.add_argument('--epoch', default=None,
                        help='checkpoint: an epoch number, best (best eval SSIM) or latest; default from best_epochs')
    parser.add_argument('--src_vendor', default='SIEMENS', help='vendor of the input volumes')
    parser.add_argument('--trg_vendor', default='Philips', help='vendor to make them look like')
    parser.add_argument('--input_dir', help='folder of NIfTI volumes '
                                            '(default dataset/Harmonization_dataset/testset/SRC_VENDOR)')
    parser.add_argument('--output_dir', help='where {stem}_harmonized.nii.gz go '
                                             '(default SAVE_DIR/EXPERIMENT/testset/SRC_to_TRG)')
    parser.add_argument('--save_dir', default=save_root, help='results root holding the experiment folders')
    parser.add_argument('--reference_dir', help='target-vendor volumes with the same names: adds metrics.csv and previews')
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
                  batch_size=args.batch_size, device=args.device, overwrite=args.overwrite, amp=args.amp)
    if failed:
        sys.exit(1)


if __name__ == '__main__':
    run_cli(cli)
