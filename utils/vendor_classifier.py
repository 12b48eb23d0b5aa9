"""A reference-free test of the vendor effect: which vendor does each patch of a volume look like?

A logistic regression (scikit-learn) on statistics of axial patches of PATCH x PATCH voxels, computed on volumes
normalised as training normalises them (utils.volume.normalise, air 0): intensity (mean, spread, percentiles),
sharpness (mean gradient), noise and fine texture (the Laplacian's spread and what a one-voxel blur removes) and
shading (the slope of the heavily blurred volume across the patch). It is trained on real scans of the two vendors,
held apart by subject from the volume it judges, and reports the share of that volume's patches it calls the target
vendor: about 1 for a real target-vendor scan, about 0 for the unharmonized input. A method that only matches
histograms moves the intensity features but not the sharpness, noise or shading ones, so it is not called the
target vendor where the vendors differ in those.
"""
import numpy as np
from scipy import ndimage

PATCH = 16  # voxels: 32 mm at 2 mm, enough for texture statistics and small enough for many patches per volume
MIN_ANATOMY = 0.6  # share of a patch inside the anatomy for it to count
SHADING_SIGMA = 6.0  # voxels: the blur that leaves the shading and removes the anatomy's detail
FEATURES = ('mean', 'std', 'p10', 'p50', 'p90', 'gradient', 'laplacian_std', 'fine_std', 'shading_slope',
            'shading_level')


def patch_features(volume, mask):
    """(N, len(FEATURES)) statistics of the axial PATCH x PATCH patches of a normalised canonical volume that lie
    at least MIN_ANATOMY inside the boolean anatomy mask."""
    volume = np.asarray(volume, dtype=np.float32)
    gradient = np.hypot(ndimage.sobel(volume, 0), ndimage.sobel(volume, 1))
    laplacian = ndimage.laplace(volume)
    fine = volume - ndimage.gaussian_filter(volume, 1.0)
    # the shading: the volume blurred over the anatomy only (normalised convolution), so the edge of the head
    # does not read as a slope
    weight = ndimage.gaussian_filter(mask.astype(np.float32), SHADING_SIGMA)
    shading = ndimage.gaussian_filter(np.where(mask, volume, 0), SHADING_SIGMA) / np.maximum(weight, 1e-3)
    shading_slope = np.hypot(*np.gradient(shading, axis=(0, 1)))
    rows = []
    size_x, size_y, size_z = volume.shape
    for z in range(size_z):
        for x in range(0, size_x - PATCH + 1, PATCH):
            for y in range(0, size_y - PATCH + 1, PATCH):
                inside = mask[x:x + PATCH, y:y + PATCH, z]
                if inside.mean() < MIN_ANATOMY:
                    continue
                values = volume[x:x + PATCH, y:y + PATCH, z][inside]
                p10, p50, p90 = np.percentile(values, (10, 50, 90))
                rows.append((values.mean(), values.std(), p10, p50, p90,
                             gradient[x:x + PATCH, y:y + PATCH, z][inside].mean(),
                             laplacian[x:x + PATCH, y:y + PATCH, z][inside].std(),
                             fine[x:x + PATCH, y:y + PATCH, z][inside].std(),
                             shading_slope[x:x + PATCH, y:y + PATCH, z][inside].mean(),
                             shading[x:x + PATCH, y:y + PATCH, z][inside].mean()))
    return np.asarray(rows, dtype=np.float64).reshape(-1, len(FEATURES))


class VendorClassifier:
    """Logistic regression of source (0) against target (1) vendor patches. `source` and `target`: lists of
    (subject, features) of real scans; fit_without(subject) trains on every scan but that subject's."""

    def __init__(self, source, target):
        self.source, self.target = source, target

    def usable_without(self, subject):
        """Whether patches of each vendor are left once `subject` is held apart."""
        return (any(name != subject and len(f) for name, f in self.source)
                and any(name != subject and len(f) for name, f in self.target))

    def fit_without(self, subject):
        """A fitted scikit-learn pipeline trained on every scan but `subject`'s, or None where a vendor has none."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        if not self.usable_without(subject):
            return None
        source = [features for name, features in self.source if name != subject]
        target = [features for name, features in self.target if name != subject]
        x = np.concatenate(source + target)
        y = np.concatenate([np.zeros(sum(len(f) for f in source)), np.ones(sum(len(f) for f in target))])
        # each vendor weighs the same whatever its number of patches
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight='balanced'))
        return model.fit(x, y)


def target_share(model, features):
    """The share of patches `model` calls the target vendor (NaN without patches or model)."""
    if model is None or len(features) == 0:
        return float('nan')
    return float(np.mean(model.predict(features) == 1))
