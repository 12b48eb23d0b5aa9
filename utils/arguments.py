"""Command-line flags of train.py, their checks, and the machine-readable copy kept with each experiment."""
import argparse
import json
import os

from model.generator import GENERATOR_FLAGS
from utils.cli import CliParser
from utils.device import AMP_CHOICES
from utils.errors import UserError
from utils.losses import DEFAULT_MATCHING_WEIGHT


def build_parser():
    parser = CliParser(
        prog='train.py', fromfile_prefix_chars='@',
        description='Train a CycleGAN that harmonizes MRI slices between two scanner vendors.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('-ex', '--experiment', required=True, help='experiment name: results go to SAVE_DIR/EXPERIMENT')
    parser.add_argument('--data_root', default='./dataset/Harmonization_dataset',
                        help='folder holding trainset/ and evalset/ slice pickles')
    parser.add_argument('--vendor1', default='SIEMENS', help='vendor A: the key of its images in the pickles')
    parser.add_argument('--vendor2', default='Philips', help='vendor B: the key of its images in the pickles')
    parser.add_argument('--save_dir', default='./results', help='results root')

    train = parser.add_argument_group('training')
    train.add_argument('--total_epoch', type=int, default=50, help='number of epochs (full passes over trainset)')
    train.add_argument('--batch_size', type=int, default=16, help='slices per optimizer step (per process under torchrun)')
    train.add_argument('--learning_rate', type=float, default=2e-4, help='Adam learning rate of all four networks')
    train.add_argument('--beta2', type=float, default=0.999,
                       help="Adam's second-moment decay (beta1 is the seed's 0.5); a lower value bounds the step a "
                            'sudden large gradient can take')
    train.add_argument('--decay_epoch', type=int, default=4,
                       help='learning rate is constant up to this epoch, then decays linearly to 0 at the last epoch')
    train.add_argument('--adv_weight', type=float, default=1.0, help='weight of the adversarial loss')
    train.add_argument('--ccl_weight', type=float, default=5.0, help='weight of the cycle-consistency L1 loss')
    train.add_argument('--identity_weight', type=float, default=1.0, help='weight of the identity L1 loss')
    train.add_argument('--oml_weight', type=float, default=None,
                       help='weight of the original-matching L1 loss, computed on true pairs only (default: 5 where '
                            'the training set has pairs, 0 where it has none)')
    train.add_argument('--dist_weight', type=float, default=0.0,
                       help='weight of the distribution term: the distance between the sorted foreground intensities '
                            'of the fakes and of the real other-vendor slices of the batch (no pairs needed)')
    train.add_argument('--warmup_epochs', type=float, default=0.0,
                       help='epochs at the start trained with the paired (oml) loss only; adversarial, cycle and '
                            'identity terms are off (not computed) during the warm-up')
    train.add_argument('--rampup_epochs', type=float, default=0.0,
                       help='after the warm-up, epochs over which those terms ramp linearly to their full weight')
    train.add_argument('--real_label', type=float, default=1.0,
                       help='target of "real" in the adversarial losses (below 1 is one-sided label smoothing)')
    train.add_argument('--gan_slices', type=int, default=0,
                       help='compute the cycle, adversarial and discriminator terms on only the first N slices of '
                            'each batch (0: all); the paired and identity terms always use the whole batch')
    train.add_argument('--gan_every', type=int, default=1,
                       help='compute the adversarial, cycle and identity terms (and step the discriminators) on '
                            'every K-th step only, at K times their weight (lazy regularisation); the steps between '
                            'are paired steps, and count as 0 in those terms\' train means in loss.csv')
    train.add_argument('--match_depth', action='store_true',
                       help='on data that is not all paired, draw each vendor-2 slice among the vendor-2 slices at the '
                            'same depth in their subject as the vendor-1 slice it is drawn with (similar anatomy)')
    train.add_argument('--pair_share', type=float, default=None,
                       help='on semi-paired data, the share of training items drawn as a pair (a slice and the other '
                            'vendor\'s scan of it) instead of independently, so that the matching term sees the few '
                            'pairs more often; default: as the independent draws fall')
    train.add_argument('--lower_bound', type=float, default=0.1,
                       help='fraction of each subject\'s slices (in slice order) skipped at the start')
    train.add_argument('--upper_bound', type=float, default=0.9,
                       help='fraction of each subject\'s slices (in slice order) where the kept range ends')
    train.add_argument('--random_seed', type=int, default=42, help='seed of all random generators')
    train.add_argument('--max_minutes', type=float, default=None,
                       help='train for this many minutes of training steps, however many epochs fit: the schedule '
                            'of --total_epoch epochs (LR decay from --decay_epoch, warm-up) is stretched over that time')

    model = parser.add_argument_group('networks')
    model.add_argument('--ngf', type=int, default=64, help='generator width (filters of the first conv)')
    model.add_argument('--n_res_blocks', type=int, default=9, help='generator depth (residual blocks)')
    model.add_argument('--input_skip', action=argparse.BooleanOptionalAction, default=False,
                       help='give the generator\'s last layer a learned curve of each input voxel\'s intensity (off in '
                            'the seed\'s network, whose instance normalisation hides the intensity level)')
    model.add_argument('--residual', action=argparse.BooleanOptionalAction, default=False,
                       help='the generator outputs a change added to its input, so it starts as the identity and '
                            'keeps the anatomy from the first step (off in the seed\'s network)')
    model.add_argument('--intensity_curve', action=argparse.BooleanOptionalAction, default=False,
                       help='pass the generator\'s input through a fixed intensity curve fitted on the training '
                            'slices (Nyul histogram standardisation of one vendor onto the other), stored with the '
                            'generator; with --residual the network learns only what a curve cannot map')
    model.add_argument('--ndf', type=int, default=64, help='discriminator width')
    model.add_argument('--d_layers', type=int, default=3, choices=[1, 2, 3],
                       help='stride-2 layers of the discriminators: each logit sees 16, 34 or 70 pixels square; a '
                            'smaller field of view judges texture and contrast rather than shapes')

    run = parser.add_argument_group('logging and running')
    run.add_argument('--save_freq', type=int, default=1, help='save checkpoints every N epochs (the last is always saved)')
    run.add_argument('--log_freq', type=int, default=200, help='print the loss terms every N iterations')
    run.add_argument('--sample_save_freq', type=int, default=100, help='save a sample grid every N iterations')
    run.add_argument('--num_workers', type=int, default=1, help='DataLoader worker processes')
    run.add_argument('--device', choices=['auto', 'cpu', 'cuda', 'mps'], default='auto', help='where to train')
    run.add_argument('--amp', nargs='?', const='on', default='off', choices=AMP_CHOICES,
                     help='mixed precision: bfloat16 autocast on CPUs with bfloat16 instructions and recent GPUs, '
                          'float16 with a grad scaler on older GPUs. "--amp" alone is "on" (an error where it '
                          'would be slow); "auto" uses it where it is fast and float32 elsewhere')
    run.add_argument('--channels_last', action='store_true',
                     help='channels-last memory format (it can make these instance-normed networks slower: time it '
                          'on your GPU with benchmarks/benchmark.py --channels_last first; see docs/performance.md)')
    run.add_argument('--compile', action='store_true',
                     help='torch.compile the networks (GPU; compiling takes a while, so it pays only in long runs; '
                          'see docs/performance.md)')
    run.add_argument('--overwrite', action='store_true', help='replace an existing experiment folder of the same name')
    run.add_argument('--resume', action='store_true', help='continue the experiment from its model/last.pth')
    run.add_argument('--stop_after_epoch', type=int, default=None,
                     help='stop (and save) after this epoch, e.g. to fit a cluster time limit; continue with --resume')
    run.add_argument('--debug', action='store_true', help='show full tracebacks')
    return parser


def check_arguments(args):
    """Reject flag values that cannot work, naming the flag and the fix."""
    if args.total_epoch < 1:
        raise UserError('--total_epoch must be at least 1')
    if args.total_epoch <= args.decay_epoch:
        raise UserError(f'--total_epoch ({args.total_epoch}) must be above --decay_epoch ({args.decay_epoch}): '
                        'the learning rate decays between them')
    if args.decay_epoch < 0:
        raise UserError('--decay_epoch must be 0 or more')
    if args.batch_size < 1:
        raise UserError('--batch_size must be at least 1')
    if not args.learning_rate > 0:
        raise UserError('--learning_rate must be positive')
    if not 0 <= args.beta2 < 1:
        raise UserError('--beta2 must be in [0, 1)')
    if not 0 <= args.lower_bound < args.upper_bound <= 1:
        raise UserError(f'--lower_bound ({args.lower_bound}) and --upper_bound ({args.upper_bound}) are fractions of '
                        'each subject\'s slices and need 0 <= lower < upper <= 1')
    for name in ('adv_weight', 'ccl_weight', 'identity_weight', 'oml_weight', 'dist_weight', 'warmup_epochs',
                 'rampup_epochs'):
        if (getattr(args, name) or 0) < 0:
            raise UserError(f'--{name} must be 0 or more')
    if args.pair_share is not None and not 0 <= args.pair_share <= 1:
        raise UserError(f'--pair_share {args.pair_share:g} is a share of the training items: pass a number from 0 to 1')
    if args.gan_slices < 0:
        raise UserError('--gan_slices must be 0 (the whole batch) or more')
    if args.gan_every < 1:
        raise UserError('--gan_every must be 1 (every step) or more')
    if not 0 < args.real_label <= 1:
        raise UserError('--real_label must be in (0, 1]')
    if args.max_minutes is not None and not args.max_minutes > 0:
        raise UserError('--max_minutes must be positive')
    for name in ('ngf', 'n_res_blocks', 'ndf', 'save_freq', 'log_freq', 'sample_save_freq'):
        if getattr(args, name) < (0 if name == 'n_res_blocks' else 1):
            raise UserError(f'--{name} must be positive')
    if args.stop_after_epoch is not None and args.stop_after_epoch < 1:
        raise UserError('--stop_after_epoch must be at least 1')
    check_loss_weights(args)
    if args.num_workers < 0:
        raise UserError('--num_workers must be 0 or more')
    if args.vendor1 == args.vendor2:
        raise UserError('--vendor1 and --vendor2 must differ')
    if args.overwrite and args.resume:
        raise UserError('--overwrite and --resume contradict each other; pass one')
    return args


def check_loss_weights(args):
    """The weights must leave something to train; an unset --oml_weight (None) counts as on."""
    oml = 1.0 if args.oml_weight is None else args.oml_weight
    if not (args.adv_weight or args.ccl_weight or args.identity_weight or oml or args.dist_weight):
        raise UserError('all loss weights are 0: nothing to train; set --oml_weight or another weight above 0')
    if args.warmup_epochs > 0 and not oml:
        raise UserError('--warmup_epochs trains with the paired loss only, so it needs --oml_weight above 0')


def resolve_matching_weight(args, n_pairs, train_dir):
    """Fill in --oml_weight once the training set is known: 5 with pairs, 0 (off) without; an explicit
    non-zero weight on data without pairs is an error."""
    if args.oml_weight is None:
        args.oml_weight = DEFAULT_MATCHING_WEIGHT if n_pairs else 0.0
    elif args.oml_weight > 0 and not n_pairs:
        raise UserError(f'--oml_weight {args.oml_weight:g}: {train_dir} has no paired slices (no subject scanned on '
                        'both vendors), so the matching term has nothing to compare; drop --oml_weight or pass 0')
    if args.warmup_epochs > 0 and not args.oml_weight:
        raise UserError(f'--warmup_epochs {args.warmup_epochs:g} trains with the matching term alone, which '
                        f'{train_dir} cannot have (no pairs); drop --warmup_epochs')
    if args.pair_share and not n_pairs:
        raise UserError(f'--pair_share {args.pair_share:g}: {train_dir} has no paired slices to draw; drop --pair_share')
    if args.gan_every > 1 and not args.oml_weight:
        raise UserError(f'--gan_every {args.gan_every} leaves the steps between to the matching term, which '
                        f'{train_dir} cannot have (no pairs); drop --gan_every')
    check_loss_weights(args)


def parse_arguments(argv=None):
    return check_arguments(build_parser().parse_args(argv))


# Flags that fix the networks' shapes and roles: a resumed run must keep them.
ARCHITECTURE_FLAGS = (*GENERATOR_FLAGS, 'ndf', 'd_layers', 'vendor1', 'vendor2')


def save_arguments(args, path):
    """Write every flag and value as JSON (readable by people and by inference_nii.py)."""
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
        json.dump(vars(args), f, indent=2, sort_keys=True)
        f.write('\n')
    os.replace(tmp, path)
