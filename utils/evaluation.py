"""Judging harmonized volumes, with or without reference scans, beside the baselines a user would pick instead.

One implementation used by evaluate.py and inference_nii.py. Every volume is brought to canonical orientation
(so files stored in different axis orders compare voxel to voxel) and normalised as training normalises it
(utils.volume.normalise over the reference region of utils.anatomy). The anatomy of a subject (the foreground of
every figure) is its mask where one is given, else utils.anatomy.anatomy_mask of the input and of the reference
(their union), or of the harmonized volume when neither is given; every method's volume is compared inside it,
with the air outside it set to 0. The figures, for each method (harmonized, unharmonized, Nyul standardisation fitted
on the target-vendor scans, N4 bias-field correction followed by Nyul (fitted on the N4-corrected target scans),
histogram matching to the pooled target-vendor histogram and, with a reference, the oracle: histogram matching
to that reference scan):

- vendor_distance: 1-D Wasserstein distance between the volume's foreground intensities and the pooled
  target-vendor ones (lower is better);
- vendor_classifier (needs other subjects' source-vendor scans): the share of the volume's patches that a
  classifier trained on real scans of both vendors, without this subject's, calls the target vendor
  (utils.vendor_classifier: intensity, sharpness, noise and shading statistics; about 1 for a real target scan,
  about 0 for the input);
- NMI and tissue_Dice (needs the source): normalized mutual information between input and output inside the
  foreground (1 independent, 2 identical; higher is better) and the mean Dice of the three tissue classes
  segmented separately in input and output (higher is better);
- CSF, GM, WM: tissue fractions of the foreground from a 3-class segmentation of the intensities, and
  tissue_difference (needs a reference): their mean absolute difference from the reference's (lower is better);
- SSIM, PSNR, MAE, Detail (needs a reference): as utils.metrics computes them (higher, higher, lower, closer to 1).
"""
import os
import tempfile

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from skimage.exposure import match_histograms
from skimage.filters import threshold_multiotsu
from skimage.metrics import normalized_mutual_information
from tqdm import tqdm

from utils.anatomy import MaskError, anatomy_mask, anatomy_on_grid, read_mask, reference_region, require_mask
from utils.bias_field import n4_correct
from utils.errors import UserError
from utils.metrics import fine_detail, foreground_values, vendor_distance, volume_metrics
from utils.vendor_classifier import VendorClassifier, patch_features, target_share
from utils.volume import find_by_stem, list_nifti, load_volume, nifti_stem, normalise, to_canonical

HARMONIZED = 'harmonized'
UNHARMONIZED = 'unharmonized'
NYUL = 'Nyul'
N4_NYUL = 'N4 + Nyul'
TARGET_MATCHING = 'histogram matching to target'
ORACLE = 'oracle: histogram matching to reference'
METRICS = ('vendor_distance', 'vendor_classifier', 'NMI', 'tissue_Dice', 'CSF', 'GM', 'WM', 'tissue_difference',
           'SSIM', 'PSNR', 'MAE', 'Detail')
TISSUES = ('CSF', 'GM', 'WM')  # T1 ordering of the mean intensities: CSF < GM < WM
TARGET_QUANTILES = 100_000
NYUL_CUTOFF = (0.01, 0.99)  # TorchIO's default quantiles of the first and last landmark
GRID_TOLERANCE_MM = 0.01
OUTPUT_SUFFIX = '_harmonized'


def subject_stem(path):
    """The subject's stem of a harmonized file: inference writes `{stem}_harmonized.nii.gz`."""
    stem = nifti_stem(path)
    return stem[:-len(OUTPUT_SUFFIX)] if stem.endswith(OUTPUT_SUFFIX) else stem


def load_canonical(path):
    """A 3-D NIfTI in canonical orientation, or UserError naming the file."""
    return to_canonical(load_volume(path))


def check_same_grid(image, path, grid, grid_path):
    """UserError unless `image` (canonical) lies on the same voxel grid as `grid` (canonical)."""
    if image.shape != grid.shape or not np.allclose(image.affine, grid.affine, atol=GRID_TOLERANCE_MM):
        raise UserError(f'{path}: grid {image.shape} differs from {grid_path}\'s {grid.shape} (shape or affine, after '
                        'reorientation); resample it onto the same grid (e.g. nibabel.processing.resample_from_to)')


def unit_volume(data, path, anatomy, region=None):
    """Canonical data normalised as training normalises it (by the robust maximum of `region`, by default the
    anatomy's reference region), 0 outside the anatomy; UserError for a volume without positive voxels there."""
    data = np.asarray(data, dtype=np.float32)
    region = reference_region(data, anatomy) if region is None else region
    try:
        return np.where(anatomy, normalise(data, region=region)[0], 0).astype(np.float32)
    except ValueError:
        raise UserError(f'{path}: no positive voxels in its anatomy (an all-zero volume); nothing to evaluate: '
                        'remove it or export it again') from None


def scan_anatomy(image, path, mask_dir=None, vendor=None):
    """The anatomy of a canonical image (utils.anatomy.anatomy_on_grid): with mask_dir, its mask there, which must
    exist (named after the file, in mask_dir/<vendor>/ or mask_dir/; vendor by default the name of the file's
    folder), else found in the image."""
    mask_path = None
    if mask_dir:
        vendor = vendor or os.path.basename(os.path.dirname(os.path.abspath(path)))
        mask_path = require_mask(mask_dir, nifti_stem(path), path, vendor)
    return anatomy_on_grid(image, path, mask_path=mask_path)


class TargetVendor:
    """The target vendor's scans: their pooled normalised foreground intensities (summarised by quantiles), Nyul
    landmarks fitted on them (TorchIO's HistogramStandardization) and, with baselines=True (the default; off where
    there is no source scan to apply them to), on their N4-corrected copies, and their patch features for the
    vendor classifier (utils.vendor_classifier), by subject; and one scan to show in the figures."""

    def __init__(self, target_dir, flag='--target_dir', mask_dir=None, vendor=None, baselines=True):
        if not os.path.isdir(target_dir):
            raise UserError(f'{flag} {target_dir}: no such folder')
        paths = list_nifti(target_dir)
        if not paths:
            raise UserError(f'{flag} {target_dir}: no .nii or .nii.gz files in it; give real target-vendor scans')
        values, used, self.features = [], [], []
        self.example = None
        with tempfile.TemporaryDirectory() as folder:  # the volumes Nyul is fitted on, one at a time in memory
            fitted = {'raw': [], 'N4': [], 'mask': []}
            for path in tqdm(paths, desc='target scans', unit='scan', leave=False):
                try:
                    image = load_canonical(path)
                    anatomy = scan_anatomy(image, path, mask_dir, vendor)
                    unit = unit_volume(image.dataobj, path, anatomy)
                except MaskError:
                    raise  # with --mask_dir every target scan needs its mask: baselines fitted on mixed masks mislead
                except UserError as error:
                    tqdm.write(f'skipped target scan: {error}')
                    continue
                values.append(foreground_values(unit[anatomy]))
                used.append(path)
                data = np.asarray(image.dataobj, dtype=np.float32)
                volumes = {'raw': data, 'mask': anatomy.astype(np.uint8)}
                if baselines:
                    volumes['N4'] = n4_correct(data, anatomy, image.header.get_zooms()[:3])
                    self.features.append((subject_stem(path), patch_features(unit, anatomy)))
                for kind, volume in volumes.items():
                    fitted[kind].append(os.path.join(folder, f'{kind}_{len(used)}.nii'))
                    nib.save(nib.Nifti1Image(volume, np.eye(4)), fitted[kind][-1])
                self.example = unit if self.example is None else self.example
            if not used:
                raise UserError(f'{flag} {target_dir}: none of its scans could be read (see above); give real '
                                'target-vendor scans')
            self.landmarks = fit_nyul(fitted['raw'], fitted['mask'])
            self.n4_landmarks = fit_nyul(fitted['N4'], fitted['mask']) if baselines else None
        self.paths = used
        if len(used) == 1:
            tqdm.write(f'warning: {flag} {target_dir} holds one usable scan; Nyul, N4 + Nyul, the pooled histogram and '
                       'the vendor classifier are fitted on it alone: give several target-vendor scans')
        # Evenly spaced order statistics keep every comparison's sort short; distances to them differ from those to
        # all voxels by ~1e-7.
        pooled = np.sort(np.concatenate(values))
        self.values = pooled[(2 * np.arange(TARGET_QUANTILES) + 1) * len(pooled) // (2 * TARGET_QUANTILES)] \
            if len(pooled) > TARGET_QUANTILES else pooled
        # Nyul's standard scale, in the target scans' own (normalised) intensities: their mean landmark range
        self.range = np.mean([np.quantile(v, NYUL_CUTOFF) for v in values], axis=0)


def fit_nyul(paths, mask_paths):
    """Nyul piecewise-linear landmarks (TorchIO's HistogramStandardization) fitted on the anatomy (the masks at
    mask_paths) of the volumes at paths."""
    import torchio
    return torchio.HistogramStandardization.train(paths, cutoff=NYUL_CUTOFF, mask_path=mask_paths, progress=False)


def nyul_standardise(data, mask, target, landmarks=None):
    """Data standardised by Nyul's method to the target's landmarks (or the given ones, e.g. target.n4_landmarks),
    using the foreground mask, with the standard scale mapped linearly onto the target scans' intensity range;
    background 0."""
    import torchio
    landmarks = target.landmarks if landmarks is None else landmarks
    mask_tensor = torch.from_numpy(np.ascontiguousarray(mask)[None])
    transform = torchio.HistogramStandardization({'volume': landmarks},
                                                 masking_method=lambda tensor: mask_tensor)
    tensor = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)[None])
    subject = torchio.Subject(volume=torchio.ScalarImage(tensor=tensor))
    standard = transform(subject)['volume'].data[0].numpy().astype(np.float64)
    low, high = landmarks[0], landmarks[-1]
    mapped = target.range[0] + (standard - low) / (high - low) * (target.range[1] - target.range[0])
    return np.where(mask, mapped, 0).astype(np.float32)


def match_to(data, mask, template_values):
    """Histogram matching (skimage) of the foreground voxels to a set of template intensities; background 0."""
    matched = np.zeros(data.shape, dtype=np.float32)
    matched[mask] = match_histograms(data[mask], np.asarray(template_values))
    return matched


def tissue_classes(volume, mask):
    """Labels 1 CSF, 2 GM, 3 WM (0 outside the mask) from the two multi-Otsu thresholds (skimage) of the
    intensities inside the mask, classes in order of intensity as on T1; None for a foreground of fewer than three
    intensity levels.

    Chosen over a 3-class Gaussian mixture, whose fit on blurred scans stops at a sample-dependent local optimum:
    Otsu's classes depend on the histogram alone and take milliseconds (docs/evaluation.md).
    """
    values = volume[mask]
    try:
        thresholds = threshold_multiotsu(values, classes=3)
    except ValueError:
        return None
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[mask] = np.digitize(values, thresholds) + 1
    return labels


def tissue_fractions(labels):
    """Fractions of the labelled foreground in each class: {'CSF': .., 'GM': .., 'WM': ..} (NaN without labels)."""
    if labels is None:
        return dict.fromkeys(TISSUES, float('nan'))
    counts = np.bincount(labels.ravel(), minlength=4)[1:4]
    return dict(zip(TISSUES, counts / max(counts.sum(), 1)))


def tissue_dice(labels, other):
    """Mean Dice overlap of the three tissue classes of two label volumes (NaN where one has none)."""
    if labels is None or other is None:
        return float('nan')
    scores = []
    for tissue in (1, 2, 3):
        a, b = labels == tissue, other == tissue
        total = a.sum() + b.sum()
        scores.append(2 * np.logical_and(a, b).sum() / total if total else 1.0)
    return float(np.mean(scores))


class Known:
    """A normalised canonical volume the methods are compared with (the source or the reference), with its tissue
    labels (inside `region`, the brain where a head surrounds it), their fractions and its fine detail computed
    once."""

    def __init__(self, volume, mask, region):
        self.volume = volume
        self.labels = tissue_classes(volume, region)
        self.fractions = tissue_fractions(self.labels)
        self.detail = fine_detail(volume, mask)


def method_row(volume, mask, region, target, source=None, reference=None, classifier=None):
    """Every figure of one method's normalised canonical volume (see the module docstring), inside the anatomy
    `mask` (tissue classes inside `region`); `source` and `reference` are Known or None, `classifier` a fitted
    vendor classifier (utils.vendor_classifier) or None."""
    labels = tissue_classes(volume, region)
    fractions = tissue_fractions(labels)
    row = dict(fractions)
    if target is not None:
        row['vendor_distance'] = vendor_distance(foreground_values(volume[mask]), target.values)
    if classifier is not None:
        row['vendor_classifier'] = target_share(classifier, patch_features(volume, mask))
    if source is not None:
        row['NMI'] = float(normalized_mutual_information(source.volume[mask], volume[mask]))
        row['tissue_Dice'] = tissue_dice(source.labels, labels)
    if reference is not None:
        row['tissue_difference'] = float(np.mean([abs(fractions[t] - reference.fractions[t]) for t in TISSUES]))
        row.update(volume_metrics(volume, reference.volume, mask))
        row['Detail'] = fine_detail(volume, mask) / reference.detail if reference.detail > 0 else float('nan')
    return row


def source_features(paths, mask_dir=None, vendor=None):
    """[(subject, patch features)] of real source-vendor scans (utils.vendor_classifier), to train the vendor
    classifier with the target scans' features; a scan that cannot be read is left out (it fails elsewhere)."""
    features = []
    for path in tqdm(paths, desc='source scans', unit='scan', leave=False):
        try:
            image = load_canonical(path)
            anatomy = scan_anatomy(image, path, mask_dir, vendor)
            features.append((subject_stem(path), patch_features(unit_volume(image.dataobj, path, anatomy), anatomy)))
        except UserError:
            continue
    return features


def evaluate_volume(stem, harmonized_path, target, source_path=None, reference_path=None, mask_path=None,
                    figure_path=None, sources=None):
    """Rows (one per method) of one harmonized volume, and its figure written to figure_path. `target` is a
    TargetVendor, or None for no vendor distance and no baselines but the oracle. mask_path: the subject's mask
    of the anatomy (else it is found in the source and reference, see the module docstring). sources: the
    source-vendor scans' features (source_features) that, with the target's, train the vendor classifier without
    this subject's scans (no vendor_classifier column where a vendor has none left).

    Raises UserError naming the file for a volume that cannot be evaluated (unreadable, 4-D, all zero, or on
    another grid than its source, reference or mask, an empty or full mask); nothing is written then.
    """
    harmonized_image = load_canonical(harmonized_path)
    others = {}
    for name, path in (('source', source_path), ('reference', reference_path)):
        if path is not None:
            others[name] = load_canonical(path)
            check_same_grid(others[name], path, harmonized_image, harmonized_path)
    raw = {name: np.asarray(image.dataobj, dtype=np.float32) for name, image in others.items()}
    if mask_path:
        mask = read_mask(mask_path, harmonized_image, harmonized_path)
    else:  # the anatomy of the input and the reference, or of the output when neither is given
        present = [(raw[name], path) for name, path in (('source', source_path), ('reference', reference_path))
                   if name in raw] or [(np.asarray(harmonized_image.dataobj, dtype=np.float32), harmonized_path)]
        mask = np.logical_or.reduce([anatomy_mask(data, path) for data, path in present])
    # One reference region for every method (the brain where a head surrounds it), from the input where given
    region = reference_region(next(iter(raw.values()), np.asarray(harmonized_image.dataobj, dtype=np.float32)), mask)
    harmonized = unit_volume(harmonized_image.dataobj, harmonized_path, mask, region)
    raw_source = raw.get('source')
    source = unit_volume(raw_source, source_path, mask, region) if source_path else None
    reference = unit_volume(raw['reference'], reference_path, mask, region) if reference_path else None

    volumes = {HARMONIZED: harmonized}
    if source is not None:
        volumes[UNHARMONIZED] = source
        if target is not None:
            volumes[NYUL] = unit_volume(nyul_standardise(raw_source, mask, target), source_path, mask, region)
            if target.n4_landmarks is not None:
                corrected = n4_correct(raw_source, mask, others['source'].header.get_zooms()[:3])
                volumes[N4_NYUL] = unit_volume(nyul_standardise(corrected, mask, target, target.n4_landmarks),
                                               source_path, mask, region)
            volumes[TARGET_MATCHING] = unit_volume(match_to(raw_source, mask, target.values), source_path, mask,
                                                   region)
        if reference is not None:
            volumes[ORACLE] = unit_volume(match_to(raw_source, mask, reference[mask]), source_path, mask, region)
    known_source = Known(source, mask, region) if source is not None else None
    known_reference = Known(reference, mask, region) if reference is not None else None
    classifier = None
    if target is not None and sources is not None:
        classifier = VendorClassifier(sources, target.features).fit_without(stem)
    rows = [{'volume': stem, 'method': method, **method_row(volume, mask, region, target, known_source,
                                                            known_reference, classifier)}
            for method, volume in volumes.items()]
    if figure_path:
        save_figure(figure_path, stem, volumes, reference, mask, target)
    return rows


def save_figure(path, stem, volumes, reference, mask, target):
    """Input, harmonized, reference (and |harmonized - reference|) and a target-vendor scan through the middle of
    the volume in three views, above the intensity histograms of input, harmonized, Nyul and target."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    columns = {'input': volumes.get(UNHARMONIZED), 'harmonized': volumes[HARMONIZED], 'reference': reference,
               '|harmonized - reference|': None if reference is None else np.abs(volumes[HARMONIZED] - reference),
               'a target-vendor scan': target.example if target is not None else None}
    columns = {name: volume for name, volume in columns.items() if volume is not None}
    views = {'axial': lambda v: v[:, :, v.shape[2] // 2].T, 'coronal': lambda v: v[:, v.shape[1] // 2, :].T,
             'sagittal': lambda v: v[v.shape[0] // 2, :, :].T}
    fig = plt.figure(figsize=(2.3 * len(columns), 9.5))
    grid = fig.add_gridspec(4, len(columns), height_ratios=(1, 1, 1, 1.2), left=0.06, right=0.98, bottom=0.06,
                            top=0.93, wspace=0.05, hspace=0.15)
    for row, (view, cut) in enumerate(views.items()):
        for col, (name, volume) in enumerate(columns.items()):
            ax = fig.add_subplot(grid[row, col])
            difference = name.startswith('|')
            ax.imshow(cut(volume), cmap='magma' if difference else 'gray', vmin=0, vmax=0.5 if difference else 1,
                      origin='lower', interpolation='nearest')
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
            if col == 0:
                ax.set_ylabel(view)
    ax = fig.add_subplot(grid[3, :])
    bins = np.linspace(0, 1, 101)
    if target is not None:
        ax.stairs(np.histogram(target.values, bins, density=True)[0], bins, fill=True, alpha=0.3, color='grey',
                  label='target vendor (pooled)')
    curves = {'input': volumes.get(UNHARMONIZED), 'harmonized': volumes[HARMONIZED], NYUL: volumes.get(NYUL)}
    for name, volume in curves.items():
        if volume is not None:
            ax.stairs(np.histogram(foreground_values(volume[mask]), bins, density=True)[0], bins, label=name)
    ax.set_xlabel('normalised intensity (foreground)')
    ax.set_ylabel('density')
    ax.legend(fontsize=8)
    fig.suptitle(stem)
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    fig.savefig(path, dpi=60)
    plt.close(fig)


def metrics_table(rows):
    """The rows as a table (volume, method, the figures that were computed), followed by one mean row per
    method (volume 'mean')."""
    table = pd.DataFrame(rows)
    columns = [column for column in METRICS if column in table.columns]
    table = table[['volume', 'method', *columns]]
    means = table.groupby('method', sort=False)[columns].mean().reset_index()
    means.insert(0, 'volume', 'mean')
    return pd.concat([table, means], ignore_index=True)


def write_table(rows, output_dir):
    """Write metrics.csv (one row per volume and method, then the means) and print the mean table; returns
    the table."""
    table = metrics_table(rows)
    path = os.path.join(output_dir, 'metrics.csv')
    table.to_csv(path, index=False, float_format='%.6g')
    print('\nmean over volumes (intensities normalised as in training, inside the foreground; lower is better for '
          'vendor_distance, tissue_difference and MAE, higher for NMI, tissue_Dice, SSIM and PSNR, Detail best at 1; '
          'see docs/evaluation.md):')
    means = table[table['volume'] == 'mean'].drop(columns='volume').set_index('method')
    print(means.to_string(float_format=lambda v: f'{v:.4f}'))
    print(f'metrics: {path}')
    return table
