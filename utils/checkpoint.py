"""Checkpoint names, and saving and loading networks and the full training state."""
import os
import re

import torch

from utils.errors import UserError


def vendor_tags(vendor1, vendor2):
    """Short names used in checkpoint files: first letters ('S', 'P'), full names if the letters collide."""
    if vendor1[:1].upper() != vendor2[:1].upper():
        return {vendor1: vendor1[:1].upper(), vendor2: vendor2[:1].upper()}
    return {vendor1: vendor1, vendor2: vendor2}


def generator_filename(tags, source, target, epoch):
    """'netG_S_to_P_epoch_50.pth'; epoch may be an int or 'best'."""
    suffix = 'best' if epoch == 'best' else f'epoch_{epoch}'
    return f'netG_{tags[source]}_to_{tags[target]}_{suffix}.pth'


def discriminator_filename(tags, vendor, epoch):
    return f'netD_{tags[vendor]}_epoch_{epoch}.pth'


def saved_generator_epochs(model_dir, tags, source, target):
    """Epoch numbers for which model_dir holds the source->target generator, ascending."""
    pattern = re.compile(rf'^netG_{re.escape(tags[source])}_to_{re.escape(tags[target])}_epoch_(\d+)\.pth$')
    names = os.listdir(model_dir) if os.path.isdir(model_dir) else []
    return sorted(int(m.group(1)) for m in map(pattern.match, names) if m)


def atomic_save(obj, path):
    """torch.save under a temporary name, then rename: an interrupted save never replaces a good file."""
    tmp = f'{path}.tmp'
    torch.save(obj, tmp)
    os.replace(tmp, path)


def plain_state_dict(module):
    """The state_dict of a network, without DDP/torch.compile wrappers in its keys."""
    module = getattr(module, 'module', module)
    module = getattr(module, '_orig_mod', module)
    return {key: value.detach().cpu() for key, value in module.state_dict().items()}


def first_line(error, limit=200):
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


def load_weights(path, module):
    """Load a plain state_dict saved by training into `module` (weights only: nothing is executed)."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise UserError(f'{path}: checkpoint not found') from None
    except Exception as error:
        raise UserError(f'{path}: not a checkpoint this project can load safely ({type(error).__name__}: '
                        f'{first_line(error)})') from None
    if not isinstance(state, dict):
        raise UserError(f'{path}: holds a {type(state).__name__}, expected a state_dict')
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        raise UserError(f'{path}: does not fit the network described by the experiment\'s arguments.txt '
                        f'(--ngf/--n_res_blocks/--ndf): {first_line(error)}') from None
    return module
