"""Pick the torch device and mixed-precision settings; nothing else in the code names CUDA."""
import functools

import torch

from utils.errors import UserError

AMP_CHOICES = ('off', 'on', 'auto')


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


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bfloat16():
    """Whether this CPU has bfloat16 instructions (AVX-512 BF16 or AMX) for oneDNN's convolutions.

    Elsewhere PyTorch still computes bfloat16 convolutions, but with a generic kernel that ran a CPU-sized
    training step 20x slower than float32 on an AVX2 machine.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with open('/proc/cpuinfo') as f:
            flags = set(' '.join(line for line in f if line.startswith('flags')).split())
    except OSError:  # not Linux: no cheap way to tell, so assume the slow kernel
        return False
    return bool(flags & {'avx512_bf16', 'amx_bf16'})


def autocast_dtype(device):
    """The reduced precision of --amp on this device: bfloat16 where supported, else float16."""
    if device.type == 'cuda':
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == 'cpu':
        return torch.bfloat16
    if device.type == 'mps':
        return torch.float16
    raise UserError(f'--amp: mixed precision is not supported on device {device.type}; drop --amp')


def amp_supported(device):
    """Whether autocast on this device runs on fast reduced-precision kernels."""
    return device.type != 'cpu' or cpu_has_fast_bfloat16()


def resolve_amp(mode, device):
    """--amp off/on/auto -> whether to autocast. 'on' where it would be slow is an error; 'auto' then
    stays in float32. Also takes True/False (from Python callers)."""
    if mode in (True, False):
        mode = 'on' if mode else 'off'
    if mode not in AMP_CHOICES:
        raise UserError(f'--amp {mode}: choose off, on or auto')
    if mode == 'off':
        return False
    autocast_dtype(device)  # raises where there is no reduced precision at all
    if amp_supported(device):
        return True
    if mode == 'on':
        raise UserError('--amp: this CPU has no bfloat16 instructions (AVX-512 BF16 or AMX), so autocast would run '
                        'many times slower than float32; drop --amp, or pass --amp auto to use it only where it is fast')
    return False


def amp_description(enabled, device):
    return f'autocast {str(autocast_dtype(device)).replace("torch.", "")}' if enabled else 'float32'


def autocast(device, enabled):
    """A torch.autocast context for --amp (a no-op context when disabled)."""
    dtype = autocast_dtype(device) if enabled else None
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)
