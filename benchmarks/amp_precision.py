"""train.py with one change to the precision of --amp, to find which layers mixed precision cannot train.

    python benchmarks/amp_precision.py VARIANT [train.py flags]

VARIANT is one of:
  as_is              train.py unchanged (the generator's downsamplings in float32 under --amp)
  bf16_downsampling  the two downsamplings autocast like every other layer (the code before the fix)
  first_only         only the first downsampling in float32
  fp16               bf16_downsampling in float16 with a grad scaler instead of bfloat16
  no_cudnn           bf16_downsampling without cuDNN (PyTorch's own kernels)
  no_empty           bf16_downsampling, trained without the slices that are pure background

This is how the --amp stall on CUDA was traced (see the README, "On a GPU"); with the demo data:
    for v in as_is bf16_downsampling first_only fp16 no_cudnn no_empty; do
        python benchmarks/amp_precision.py $v --amp -ex $v --data_root DATASET --device cuda \\
            --total_epoch 2 --decay_epoch 1 --stop_after_epoch 1 --overwrite
    done
"""
import sys

import torch
import torch.nn as nn

import train
from dataset import dataset
from model import generator
from utils import device as device_module
from utils import trainer as trainer_module
from utils.errors import UserError, run_cli

VARIANTS = ('as_is', 'bf16_downsampling', 'first_only', 'fp16', 'no_cudnn', 'no_empty')


def autocast_downsamplings(keep_first_in_float32=False):
    """Let autocast run the generator's downsamplings (both, or all but the first) in reduced precision."""
    float32_forward, autocast_forward = generator.Float32Conv2d.forward, nn.Conv2d.forward
    build = generator.Generator.__init__

    def init(self, *args, **kwargs):
        build(self, *args, **kwargs)
        downsamplings = [layer for layer in self.model if isinstance(layer, generator.Float32Conv2d)]
        for index, layer in enumerate(downsamplings):
            layer.stays_float32 = keep_first_in_float32 and index == 0

    def forward(self, x):
        return (float32_forward if self.stays_float32 else autocast_forward)(self, x)

    generator.Generator.__init__ = init
    generator.Float32Conv2d.forward = forward


def without_empty_training_slices():
    build = dataset.Paired_Dataset.__init__

    def init(self, *args, **kwargs):
        build(self, *args, **kwargs)
        if kwargs.get('split') == 'trainset':
            if self.cache is None:
                root = kwargs.get('data_root') or args[0]
                raise UserError(f'no_empty needs the training slices cached in memory, and {root} is over the cache '
                                'limit; run it on a smaller dataset (fewer subjects)')
            keep = [i for i in range(len(self.paths)) if (self.cache[i] > -1).any()]
            print(f'no_empty: training on {len(keep)} of {len(self.paths)} slices')
            self.paths, self.cache = [self.paths[i] for i in keep], self.cache[keep]
    dataset.Paired_Dataset.__init__ = init


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in VARIANTS:
        sys.exit(f'usage: python benchmarks/amp_precision.py {{{",".join(VARIANTS)}}} [train.py flags]')
    variant, train_argv = sys.argv[1], sys.argv[2:]
    if variant != 'as_is':
        autocast_downsamplings(keep_first_in_float32=variant == 'first_only')
    if variant == 'fp16':
        device_module.autocast_dtype = trainer_module.autocast_dtype = lambda device: torch.float16
    if variant == 'no_cudnn':
        torch.backends.cudnn.enabled = False
    if variant == 'no_empty':
        without_empty_training_slices()
    run_cli(train.main, train_argv)


if __name__ == '__main__':
    main()
