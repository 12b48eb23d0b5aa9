"""Pick the torch device and mixed-precision settings; nothing else in the code names CUDA."""
import torch

from utils.errors import UserError


def pick_device(name='auto'):
    """'auto' takes CUDA, then Apple MPS, then the CPU."""
    if name == 'auto':
        if torch.cuda.is_available():
            return torch.device('cuda')
        if getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available():
            return torch.device('mps')
        return torch.device('cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto')
    if name == 'mps' and not (getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available()):
        raise UserError('--device mps: Apple MPS is not available here; use --device cpu or auto')
    return torch.device(name)


def autocast_dtype(device):
    """The reduced precision used by --amp on this device: bfloat16 where supported, else float16."""
    if device.type == 'cuda':
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == 'cpu':
        return torch.bfloat16
    if device.type == 'mps':
        return torch.float16
    raise UserError(f'--amp: mixed precision is not supported on device {device.type}; drop --amp')


def autocast(device, enabled):
    """A torch.autocast context for --amp (a no-op context when disabled)."""
    dtype = autocast_dtype(device) if enabled else None
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)
