"""SSIM and PSNR as skimage.metrics computes them, on images scaled to [0, 1] (data_range=1), a measure of
fine texture, and the distance between two vendors' intensity distributions."""
import math

import numpy as np
import torch
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def to_unit_range(images):
    """Network images in [-1, 1] (tensor, any leading dims) -> float64 numpy in [0, 1]."""
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy()
    return np.clip((np.asarray(images, dtype=np.float64) + 1) / 2, 0, 1)


def ssim(prediction, target):
    """SSIM of two 2-D images in [0, 1]."""
    return structural_similarity(prediction, target, data_range=1.0)


def psnr(prediction, target):
    """PSNR in dB of two images in [0, 1] (inf when identical)."""
    return peak_signal_noise_ratio(target, prediction, data_range=1.0)


class SetMetrics:
    """Accumulates SSIM and PSNR over a whole set of slices.

    SSIM is the mean of the per-slice SSIMs; PSNR comes from the mean squared error over every pixel of
    the set (it equals skimage's PSNR of all slices stacked), so one empty slice cannot make it infinite.
    Sums are kept so that processes under torchrun can add theirs together.
    """

    def __init__(self):
        self.ssim_sum = 0.0
        self.slices = 0
        self.squared_error_sum = 0.0
        self.pixels = 0

    def update(self, prediction, target):
        """Add a batch of network outputs and targets, tensors (N, 1, H, W) in [-1, 1]."""
        prediction, target = to_unit_range(prediction), to_unit_range(target)
        for p, t in zip(prediction.reshape(-1, *prediction.shape[-2:]), target.reshape(-1, *target.shape[-2:])):
            self.ssim_sum += ssim(p, t)
            self.slices += 1
        self.squared_error_sum += float(np.sum((prediction - target) ** 2))
        self.pixels += prediction.size

    def as_tensor(self):
        return torch.tensor([self.ssim_sum, self.slices, self.squared_error_sum, self.pixels], dtype=torch.float64)

    def add_tensor(self, sums):
        self.ssim_sum, self.slices, self.squared_error_sum, self.pixels = (float(v) for v in sums)

    @property
    def ssim(self):
        return self.ssim_sum / self.slices if self.slices else float('nan')

    @property
    def psnr(self):
        if not self.pixels:
            return float('nan')
        mse = self.squared_error_sum / self.pixels
        return float('inf') if mse == 0 else 10 * math.log10(1.0 / mse)


def volume_metrics(prediction, reference, mask):
    """SSIM, PSNR (dB) and MAE of two volumes in [0, 1], inside a boolean foreground mask.

    SSIM is skimage's 3-D SSIM map (data_range=1) averaged over the mask; PSNR and MAE use the masked voxels.
    """
    _, ssim_map = structural_similarity(reference, prediction, data_range=1.0, full=True)
    error = prediction[mask].astype(np.float64) - reference[mask]
    mse = float(np.mean(error ** 2))
    return {'SSIM': float(ssim_map[mask].mean()),
            'PSNR': float('inf') if mse == 0 else 10 * math.log10(1.0 / mse),
            'MAE': float(np.mean(np.abs(error)))}


def fine_detail(volume, mask, sigma=1.0):
    """Standard deviation of what a Gaussian blur (sigma in voxels) removes from a volume, inside the mask shrunk
    by 2 voxels (so that the edge of the head does not count): its fine texture and noise. NaN where nothing of
    the mask is left after shrinking it (a volume of 4 slices or fewer).

    The ratio of a harmonized volume's figure to the real target scan's says how much of that vendor's texture
    it has: 1 as much, below 1 smoother (a model trained on L1 alone averages the noise away).
    """
    volume = np.asarray(volume, dtype=np.float64)
    inner = ndimage.binary_erosion(mask, iterations=2)
    if not inner.any():
        return float('nan')
    return float((volume - ndimage.gaussian_filter(volume, sigma))[inner].std())


def foreground_values(images, threshold=0.0):
    """The intensities above `threshold` of any number of images in [0, 1], as one flat float64 array
    (the background of a skull-stripped or zero-background scan is left out)."""
    values = np.asarray(images, dtype=np.float64).ravel()
    return values[values > threshold]


def vendor_distance(values, target_values):
    """1-D Wasserstein distance between two sets of foreground intensities (both in [0, 1]): how far a volume's
    intensity distribution is from the target vendor's. 0 for the same distribution; lower is better."""
    from scipy.stats import wasserstein_distance
    if len(values) == 0 or len(target_values) == 0:
        return float('nan')
    return float(wasserstein_distance(values, target_values))


class DistributionMetrics:
    """Reference-free figures of one direction over a whole set of slices, for data without pairs:

    - vendor distance: vendor_distance between the harmonized foreground and the real target-vendor foreground,
      computed on 256-bin histograms of [0, 1] (lower is better);
    - anatomy kept: normalized mutual information (H(input) + H(output)) / H(input, output) of input and output
      foreground voxels, as skimage.metrics.normalized_mutual_information defines it, on a 64-bin joint histogram
      of [0, 1]:
      2 when the output is any one-to-one remapping of the input's intensities, 1 when it is unrelated to it
      (higher is better).
    Histograms are kept, so processes under torchrun can add theirs together.
    """

    BINS, JOINT_BINS = 256, 64

    def __init__(self):
        self.output = np.zeros(self.BINS)
        self.target = np.zeros(self.BINS)
        self.joint = np.zeros((self.JOINT_BINS, self.JOINT_BINS))

    def update(self, inputs, outputs):
        """Add network inputs and their outputs, tensors (N, 1, H, W) in [-1, 1]; the input's zeros are background."""
        inputs, outputs = to_unit_range(inputs).ravel(), to_unit_range(outputs).ravel()
        foreground = inputs > 0
        self.output += np.histogram(outputs[foreground], self.BINS, (0, 1))[0]
        self.joint += np.histogram2d(inputs[foreground], outputs[foreground], self.JOINT_BINS, [(0, 1), (0, 1)])[0]

    def update_target(self, targets):
        """Add real target-vendor slices (N, 1, H, W) in [-1, 1]."""
        values = to_unit_range(targets).ravel()
        self.target += np.histogram(values[values > 0], self.BINS, (0, 1))[0]

    def as_tensor(self):
        return torch.from_numpy(np.concatenate([self.output, self.target, self.joint.ravel()]))

    def add_tensor(self, sums):
        sums = np.asarray(sums, dtype=np.float64)
        self.output, self.target = sums[:self.BINS], sums[self.BINS:2 * self.BINS]
        self.joint = sums[2 * self.BINS:].reshape(self.JOINT_BINS, self.JOINT_BINS)

    @property
    def vendor_distance(self):
        if not (self.output.sum() and self.target.sum()):
            return float('nan')
        centres = (np.arange(self.BINS) + 0.5) / self.BINS
        return vendor_distance_of_histograms(centres, self.output, self.target)

    @property
    def anatomy(self):
        total = self.joint.sum()
        if not total:
            return float('nan')
        p = self.joint / total

        def entropy(q):
            q = q[q > 0]
            return float(-np.sum(q * np.log(q)))
        joint_entropy = entropy(p.ravel())
        return (entropy(p.sum(axis=1)) + entropy(p.sum(axis=0))) / joint_entropy if joint_entropy else 2.0


def vendor_distance_of_histograms(centres, counts, target_counts):
    """vendor_distance of two sets of values given as counts on the same bins."""
    from scipy.stats import wasserstein_distance
    return float(wasserstein_distance(centres, centres, counts, target_counts))
