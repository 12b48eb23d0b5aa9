"""train.py with one change to the precision of --amp, to find which layers mixed precision cannot train.

    python experiments/amp_precision.py VARIANT [train.py flags]

VARIANT is one of:
  as_is              train.py unchanged (the generator's downsamplings in float32 under --amp)
  bf16_downsampling  the two downsamplings autocast like every other layer (the code before the fix)
  first_only         only the first downsampling in float32
  no_cudnn           bf16_downsampling without cuDNN (PyTorch's own kernels)

On a GPU without bfloat16 (where --amp is float16 with a grad scaler), bf16_downsampling is the float16
variant. docs/performance.md ("Kernels and precision") has the results; with the demo data:
    for v in as_is bf16_downsampling first_only no_cudnn; do
        python experiments/amp_precision.py $v --amp -ex $v --data_root DATASET --device cuda \\
            --total_epoch 2 --decay_epoch 1 --stop_after_epoch 1 --overwrite
    done
"""
import sys

import torch

import train
from utils.errors import run_cli

# variant -> how many of the generator's two downsamplings stay in float32 (model.generator.Generator)
FLOAT32_DOWNSAMPLINGS = {'as_is': 2, 'bf16_downsampling': 0, 'first_only': 1, 'no_cudnn': 0}


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in FLOAT32_DOWNSAMPLINGS:
        sys.exit(f'usage: python experiments/amp_precision.py {{{",".join(FLOAT32_DOWNSAMPLINGS)}}} [train.py flags]')
    variant, train_argv = sys.argv[1], sys.argv[2:]
    if variant == 'no_cudnn':
        torch.backends.cudnn.enabled = False
    options = {'float32_downsamplings': FLOAT32_DOWNSAMPLINGS[variant]}
    run_cli(lambda argv: train.main(argv, generator_options=options), train_argv)


if __name__ == '__main__':
    main()
