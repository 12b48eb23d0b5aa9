"""Judge a folder of harmonized volumes: is the vendor effect gone, and is the anatomy still there?

    python evaluate.py --harmonized_dir results/MyExperiment/testset/SIEMENS_to_Philips \
        --target_dir dataset/scans/Philips \
        --source_dir dataset/Harmonization_dataset/testset/SIEMENS \
        --reference_dir dataset/Harmonization_dataset/testset/Philips    # optional: the same subjects on the target

Works on any tool's outputs, on scans as scanners write them (noise in the air, a head around the brain) or
skull-stripped ones. Harmonized files are matched to their source, reference and mask by file stem
(`{stem}_harmonized.nii.gz`, as inference_nii.py writes them, or `{stem}.nii.gz`); every figure is computed inside
the anatomy (--mask_dir, or found in the scans: utils/anatomy.py). Each volume is compared with
the unharmonized input, Nyul standardisation fitted on the --target_dir scans, N4 bias-field correction followed by
Nyul (what most multi-site studies run), histogram matching to the pooled --target_dir histogram and, where a
reference exists, the oracle (histogram matching to that very reference). A vendor classifier trained on the
--source_dir and --target_dir scans of other subjects says which vendor each method's volume looks like.
Writes OUTPUT_DIR/metrics.csv (one row per volume and method, then the means) and OUTPUT_DIR/previews/{stem}.png,
and prints the mean table. What each figure means: docs/evaluation.md.
"""
import argparse
import os
import sys
import time
import warnings

from tqdm import tqdm

from utils.anatomy import require_mask
from utils.cli import CliParser
from utils.errors import UserError, run_cli
from utils.evaluation import TargetVendor, evaluate_volume, source_features, subject_stem, write_table
from utils.paths import check_writable_folder
from utils.volume import find_by_stem, list_nifti


def build_parser():
    parser = CliParser(prog='evaluate.py', description=__doc__.split('\n\n')[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--harmonized_dir', required=True, help='folder of harmonized NIfTI volumes (any tool\'s)')
    parser.add_argument('--target_dir', required=True,
                        help='real target-vendor scans of any subjects: the intensity distribution to match')
    parser.add_argument('--source_dir', help='the unharmonized inputs, same stems: adds the anatomy figures and the '
                                             'baselines')
    parser.add_argument('--reference_dir', help='the same subjects scanned on the target vendor, same stems: adds '
                                                'SSIM, PSNR, MAE, Detail and the tissue-volume difference')
    parser.add_argument('--mask_dir', help='masks of the anatomy (brain or head, non-zero inside), one for each '
                                           'evaluated subject and each --target_dir scan, named after it ({stem}, '
                                           '{stem}_mask, {stem}_brainmask or {stem}_brain_mask .nii(.gz)), in '
                                           'MASK_DIR/<name of the scan\'s folder>/ or MASK_DIR/ (a harmonized '
                                           'volume takes its source\'s). Without it the anatomy is found in the '
                                           'scans (utils/anatomy.py)')
    parser.add_argument('--output_dir', help='where metrics.csv and previews/ go (default HARMONIZED_DIR/evaluation)')
    parser.add_argument('--overwrite', action='store_true', help='replace an earlier metrics.csv and previews/ there')
    parser.add_argument('--debug', action='store_true', help='show full tracebacks')
    return parser


def check_folder(folder, flag):
    if folder is not None and not os.path.isdir(folder):
        raise UserError(f'{flag} {folder}: no such folder')


def main(argv=None):
    """Evaluate every volume of --harmonized_dir; returns the files that could not be evaluated."""
    args = build_parser().parse_args(argv)
    for folder, flag in ((args.harmonized_dir, '--harmonized_dir'), (args.source_dir, '--source_dir'),
                         (args.reference_dir, '--reference_dir'), (args.mask_dir, '--mask_dir')):
        check_folder(folder, flag)
    harmonized = list_nifti(args.harmonized_dir)
    if not harmonized:
        raise UserError(f'--harmonized_dir {args.harmonized_dir}: no .nii or .nii.gz files in it')
    stems = {}
    for path in harmonized:
        stem = subject_stem(path)
        if stem in stems:
            raise UserError(f'{path} and {stems[stem]} are both the subject {stem}; '
                            'keep one of them in --harmonized_dir')
        stems[stem] = path
    matches = {}
    for folder, flag in ((args.source_dir, '--source_dir'), (args.reference_dir, '--reference_dir')):
        if folder is not None:
            matches[flag] = {stem: find_by_stem(folder, stem) for stem in stems}
            missing = [stem for stem, path in matches[flag].items() if path is None]
            if len(missing) == len(stems):
                raise UserError(f'{flag} {folder}: no file stem in common with --harmonized_dir {args.harmonized_dir} '
                                f'(e.g. {next(iter(stems))}.nii.gz); name the files after the same subjects')
            if missing:
                print(f'warning: no {", ".join(missing)} in {flag} {folder}; those are evaluated without it')
    output_dir = args.output_dir or os.path.join(args.harmonized_dir, 'evaluation')
    earlier = [name for name in ('metrics.csv', 'previews') if os.path.exists(os.path.join(output_dir, name))]
    if earlier and not args.overwrite:
        raise UserError(f'--output_dir {output_dir} already holds {" and ".join(earlier)} of an earlier evaluation; '
                        'pass --overwrite to replace them or choose another --output_dir')
    check_writable_folder(output_dir, '--output_dir')
    target = TargetVendor(args.target_dir, mask_dir=args.mask_dir, baselines=args.source_dir is not None)
    print(f'{len(stems)} harmonized volume(s) from {args.harmonized_dir} against {len(target.paths)} target-vendor '
          f'scan(s) from {args.target_dir} (Nyul fitted on them)')

    sources = source_features([path for path in matches.get('--source_dir', {}).values() if path], args.mask_dir)
    # a harmonized volume lies on its input's grid: its mask is the source vendor's (mask_dir/<source folder>/)
    mask_vendor = os.path.basename(os.path.abspath(args.source_dir)) if args.source_dir else None
    rows, failed, started = [], [], time.perf_counter()
    for stem, path in tqdm(stems.items(), desc='volumes', unit='volume'):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter('always')
                rows += evaluate_volume(
                    stem, path, target,
                    source_path=matches.get('--source_dir', {}).get(stem),
                    reference_path=matches.get('--reference_dir', {}).get(stem),
                    mask_path=require_mask(args.mask_dir, stem, path, mask_vendor) if args.mask_dir else None,
                    figure_path=os.path.join(output_dir, 'previews', f'{stem}.png'), sources=sources)
            for warning in caught:
                tqdm.write(f'warning: {warning.message}')
        except UserError as error:
            failed.append(path)
            tqdm.write(f'failed: {error}')
    if not rows:
        raise UserError(f'--harmonized_dir {args.harmonized_dir}: no volume could be evaluated (see above)',
                        exit_code=1)
    seconds = (time.perf_counter() - started) / (len(stems) - len(failed))
    write_table(rows, output_dir)
    print(f'previews: {os.path.join(output_dir, "previews")}/; {seconds:.1f} s per volume'
          + (f'; {len(failed)} failed: {", ".join(failed)}' if failed else ''))
    return failed


def cli(argv):
    if main(argv):
        sys.exit(1)


if __name__ == '__main__':
    run_cli(cli)
