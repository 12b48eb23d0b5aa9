"""N4 bias-field correction (SimpleITK), the step most multi-site studies run before Nyul standardisation.

The field is fitted on a copy shrunk by up to MAX_SHRINK towards voxels of FIT_VOXEL_MM (the usual speed-up: the
field is smooth), inside the anatomy only (the air holds no shading, nor do the voxels of a generous mask that
are about 0), and then evaluated on the full grid, so the corrected volume keeps every voxel of the input:
corrected = input / exp(log field).
"""
import numpy as np

FIT_VOXEL_MM = 8.0
MAX_SHRINK = 4
ITERATIONS = (100, 50)  # per fitting level, coarse to fine
SPLINE_DISTANCE_MM = 100.0  # control-point spacing of the first fitting level: a coil's shading, not anatomy
MIN_SLICES = 4
DARK_SHARE = 0.01  # of the robust maximum: voxels below it (zeros of a generous mask) carry no shading to fit


def n4_correct(data, mask, spacing=(1.0, 1.0, 1.0)):
    """The volume (X, Y, Z) divided by the N4 bias field fitted inside the boolean `mask`; spacing in mm.
    Values outside the mask are divided by the field's smooth continuation, so the air keeps its level. A volume
    too thin for a 3-D fit (fewer than MIN_SLICES along an axis), or one where ITK finds no field, is returned as
    it is: no shading is removed."""
    import SimpleITK as sitk
    data = np.asarray(data, dtype=np.float32)
    if min(data.shape) < MIN_SLICES or not mask.any():
        return data.copy()
    # SimpleITK arrays are (Z, Y, X): transpose so that the spacing applies to the right axes
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.clip(data, 0, None).T))
    image.SetSpacing(tuple(float(s) for s in spacing))
    fitted = mask & (data > DARK_SHARE * np.percentile(data[mask], 99.5)) if mask.any() else mask
    mask_image = sitk.GetImageFromArray(np.ascontiguousarray(fitted.astype(np.uint8).T))
    mask_image.CopyInformation(image)
    factor = int(max(1, min(MAX_SHRINK, FIT_VOXEL_MM // max(min(spacing), 1e-3))))
    shrink = [factor if size >= 8 * factor else 1 for size in image.GetSize()]
    small, small_mask = sitk.Shrink(image, shrink), sitk.Shrink(mask_image, shrink)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations(list(ITERATIONS))
    extent = np.asarray(small.GetSize()) * np.asarray(small.GetSpacing())
    corrector.SetNumberOfControlPoints([max(4, int(np.ceil(e / SPLINE_DISTANCE_MM)) + 3) for e in extent])
    try:
        corrector.Execute(small, small_mask)
        log_field = sitk.GetArrayFromImage(corrector.GetLogBiasFieldAsImage(image)).T
    except RuntimeError:  # ITK's refusal (e.g. a mask with too few voxels left after shrinking)
        return data.copy()
    return (data / np.exp(log_field)).astype(np.float32)
