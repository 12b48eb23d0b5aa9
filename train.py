"""Train a CycleGAN that harmonizes MRI slices between two scanner vendors.

    python train.py -ex NAME --data_root DATASET [flags]           # one process: CPU, one GPU or MPS
    python train.py @recipes/cpu.args -ex NAME --data_root DATASET  # the laptop recipe
    torchrun --nproc_per_node=4 train.py -ex NAME ...               # several GPUs (or nodes)
    python train.py -ex NAME ... --resume                           # continue from results/NAME/model/last.pth

Writes results/NAME/{arguments.txt, dataset_info.json, summary.json, loss/, model/, sample/}; summary.json
(steps, seconds of training steps, the last epoch's eval metrics, the best epochs) is rewritten after each epoch.
"""
import os
import shutil
import sys

import torch

from model.generator import generator_config
from utils.arguments import ARCHITECTURE_FLAGS, parse_arguments, save_arguments
from utils.cpu_memory import keep_freed_memory
from utils.device import amp_description, pick_device
from utils.distributed import setup_process_group, teardown_process_group
from utils.errors import UserError, run_cli
from utils.paths import check_writable_folder
from utils.trainer import CycleGANTrainer

def load_resume_state(args, experiment_dir):
    """model/last.pth of the experiment, checked against the flags that fix the networks' shapes."""
    path = os.path.join(experiment_dir, 'model', 'last.pth')
    if not os.path.exists(path):
        raise UserError(f'--resume: {path} not found; train {args.experiment} from scratch (without --resume)')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:
        raise UserError(f'--resume: {path} cannot be loaded ({type(error).__name__}); '
                        'it is not a training state written by train.py') from None
    not_a_state = UserError(f'--resume: {path} is not a training state written by train.py (a checkpoint copied '
                            'over it?); start the experiment again without --resume')
    if not (isinstance(state, dict) and {'epoch', 'networks', 'args'} <= set(state)):
        raise not_a_state
    try:  # states written before the generator's configuration was stored have it in their flags only
        trained = {'d_layers': 3,  # the only discriminator there was before --d_layers
                   **state['args'], **(state.get('generator_config') or generator_config(state['args']))}
    except (KeyError, TypeError):
        raise not_a_state from None
    for flag in ARCHITECTURE_FLAGS:
        if trained.get(flag) != getattr(args, flag):
            raise UserError(f'--resume: --{flag} {getattr(args, flag)} differs from {trained.get(flag)} that '
                            f'{args.experiment} was trained with; drop the flag or start a new experiment')
    return state


def prepare_experiment_dir(args, experiment_dir):
    """Create results/NAME/ (emptied first with --overwrite); refuse to mix into an existing experiment."""
    if os.path.exists(experiment_dir) and not args.resume:
        if not args.overwrite:
            raise UserError(f'{experiment_dir} already exists; pick another -ex name, pass --resume to continue it, '
                            'or --overwrite to replace it')
        shutil.rmtree(experiment_dir)
    for sub in ('loss', 'model', 'sample'):
        os.makedirs(os.path.join(experiment_dir, sub), exist_ok=True)
    save_arguments(args, os.path.join(experiment_dir, 'arguments.txt'))
    dataset_info = os.path.join(args.data_root, 'dataset_info.json')
    if os.path.exists(dataset_info):
        shutil.copyfile(dataset_info, os.path.join(experiment_dir, 'dataset_info.json'))
    else:
        print(f'note: {dataset_info} not found: inference will leave outputs in the normalised [0, 1] scale')


def main(argv=None, clock=None, generator_options=None):
    """clock and generator_options go to CycleGANTrainer (experiments/ pass them; the command line does not)."""
    args = parse_arguments(argv)
    keep_freed_memory()
    process = setup_process_group(args.device)
    try:
        device = pick_device(args.device)
        if device.type == 'cuda':
            device = torch.device('cuda', process.local_rank)
            torch.backends.cudnn.benchmark = True
        experiment_dir = os.path.join(args.save_dir, args.experiment)
        if process.is_main:
            check_writable_folder(args.save_dir, '--save_dir')
        state = load_resume_state(args, experiment_dir) if args.resume else None

        trainer = CycleGANTrainer(args, device, experiment_dir, process, clock=clock,
                                  generator_options=generator_options)
        if state is not None:
            try:
                trainer.load_state(state)
            except (KeyError, RuntimeError, ValueError, TypeError) as error:
                raise UserError(f'--resume: {experiment_dir}/model/last.pth does not fit this experiment '
                                f'({type(error).__name__}); start again without --resume') from None
        if process.is_main:
            prepare_experiment_dir(args, experiment_dir)
            print(f'training on {device} in {amp_description(trainer.amp, device)} '
                  f'({process.world_size} process{"es" if process.distributed else ""}): '
                  f'{len(trainer.train_set)} train / {len(trainer.eval_set)} eval slices of '
                  f'{trainer.train_set.image_size[0]}x{trainer.train_set.image_size[1]}, '
                  + (f'for {args.max_minutes:g} minutes of training steps' if args.max_minutes
                     else f'epochs {trainer.start_epoch}..{args.total_epoch}'))
        try:
            last_epoch = trainer.fit()
        except KeyboardInterrupt:
            if process.is_main:
                print(f'\ninterrupted: {experiment_dir}/model/last.pth holds the last finished epoch; '
                      'continue with the same command and --resume', file=sys.stderr)
            sys.exit(130)
        if process.is_main:
            print(f'done after epoch {last_epoch} ({trainer.steps} steps in this run, {trainer.train_seconds:.0f} s of '
                  f'training steps in all): results in {experiment_dir}/ '
                  f'(summary.json, loss/loss.csv, loss/loss.png, model/, sample/)')
    finally:
        teardown_process_group()


if __name__ == '__main__':
    run_cli(main)
