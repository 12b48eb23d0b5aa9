"""Checkpoint names, and saving and loading networks and the full training state.

A generator file holds {'generator_config': ..., 'state_dict': ...}: the network is rebuilt from the
configuration stored with its weights. Files written before configurations were stored hold the state_dict
alone; their configuration comes from the experiment's arguments.txt.
"""
import json
import os
import re

import torch

from model.generator import GENERATOR_FLAGS, build_generator, generator_config
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


def atomic_write_json(value, path):
    """JSON under a temporary name, then rename, as atomic_save."""
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
        json.dump(value, f, indent=2)
        f.write('\n')
    os.replace(tmp, path)


def unwrapped(module):
    """The network inside DDP/torch.compile wrappers."""
    module = getattr(module, 'module', module)
    return getattr(module, '_orig_mod', module)


def plain_state_dict(module):
    """The state_dict of a network, without DDP/torch.compile wrappers in its keys."""
    return {key: value.detach().cpu() for key, value in unwrapped(module).state_dict().items()}


def first_line(error, limit=200):
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


def generator_checkpoint(generator):
    """What a generator file holds: its configuration and its weights, both loadable with weights_only=True."""
    return {'generator_config': dict(unwrapped(generator).config), 'state_dict': plain_state_dict(generator)}


def read_checkpoint(path):
    """The dict in a .pth file written by training, loaded as weights only (nothing in the file is executed)."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise UserError(f'{path}: checkpoint not found') from None
    except Exception as error:
        raise UserError(f'{path}: not a checkpoint this project can load safely ({type(error).__name__}: '
                        f'{first_line(error)})') from None
    if not isinstance(state, dict):
        raise UserError(f'{path}: holds a {type(state).__name__}, expected a state_dict')
    return state


def load_weights(path, module, state_dict=None, described_by='the network it is loaded into'):
    """Load a state_dict (read from `path` unless given) into `module`; a mismatch names `described_by`."""
    state_dict = read_checkpoint(path) if state_dict is None else state_dict
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise UserError(f'{path}: does not fit {described_by}: {first_line(error)}') from None
    return module


def load_generator_checkpoint(path, arguments, arguments_path="the experiment's arguments.txt"):
    """The generator saved in `path`, rebuilt from the configuration stored with it; for a file written before
    configurations were stored (a plain state_dict), from `arguments`, the experiment's arguments.txt as a dict
    (read from `arguments_path`, which error messages name)."""
    state = read_checkpoint(path)
    if 'generator_config' in state:
        config = state['generator_config']
        if not isinstance(config, dict) or not isinstance(state.get('state_dict'), dict):
            raise UserError(f'{path}: its generator_config or state_dict is damaged; use another --epoch or retrain')
        state_dict, described_by = state['state_dict'], 'the generator configuration stored in it'
    else:
        try:
            config = generator_config(arguments)
        except KeyError as missing:
            flag = missing.args[0]
            raise UserError(f'{path} predates stored network configurations, and {arguments_path} lacks {flag!r}, '
                            f'which it needs; add the --{flag} it was trained with to it') from None
        state_dict = state
        described_by = (f'the generator described by {arguments_path} ('
                        + ', '.join(f'--{flag} {config[flag]}' for flag in GENERATOR_FLAGS) + ')')
    try:
        generator = build_generator(config)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise UserError(f'{path}: its generator configuration {config} cannot be built ({type(error).__name__}: '
                        f'{first_line(error)})') from None
    return load_weights(path, generator, state_dict, described_by)


def load_arguments(path):
    """The flags an experiment was trained with, as a dict."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f'{path} not found: is this a folder written by train.py? (check --experiment/--save_dir)') from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f'{path} is not the JSON that train.py writes; re-create it or retrain') from None
