"""The CycleGAN's losses as functions of the images and the networks, and their weights over training.

Generator loss = adv * Adversarial + ccl * Cycle + identity * Identity + oml * Matching, where
  Adversarial = BCE(D_B(G_AB(A)), real) + BCE(D_A(G_BA(B)), real)
  Cycle       = |G_BA(G_AB(A)) - A| + |G_AB(G_BA(B)) - B|
  Identity    = |G_AB(B) - B| + |G_BA(A) - A|
  Matching    = |G_AB(A) - B| + |G_BA(B) - A|          (the paired, "original matching" term)
  Distribution = W(G_AB(A), B) + W(G_BA(B), A), W the mean |difference| of the two sorted sets of foreground
                intensities: how far the fakes' intensity histogram is from the real other vendor's in the
                same batch (unpaired data draws the batch's two vendors at matching depths, see VendorDraws)
On data that is not all paired, A and B are drawn independently and Matching compares G_AB(A) with the
vendor-B scan of the same slice, and G_BA(B) with the vendor-A one, over only the slices that have one (a
single-vendor slice never enters it); it is 0 for a batch without such slices.
Each discriminator: BCE(D(real), real) + BCE(D(fake.detach()), 0).
A term whose weight is zero costs nothing: its generator passes are not run. With gan_slices = N > 0 the
cycle and adversarial terms (and the discriminators' loss) see only the first N slices of the batch.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TERMS = ('Adversarial', 'Cycle', 'Identity', 'Matching', 'Distribution')
DEFAULT_MATCHING_WEIGHT = 5.0  # the seed's --oml_weight, used where the flag is not given and the data has pairs


@dataclass(frozen=True)
class LossWeights:
    adv: float
    ccl: float
    identity: float
    oml: float
    dist: float = 0.0

    def weighted_total(self, terms):
        return (self.adv * terms['Adversarial'] + self.ccl * terms['Cycle'] + self.identity * terms['Identity']
                + self.oml * terms['Matching'] + self.dist * terms['Distribution'])


def full_weights(args):
    """The flags' weights; an unset --oml_weight (None, before the trainer has seen the data) is the seed's."""
    oml = DEFAULT_MATCHING_WEIGHT if args.oml_weight is None else args.oml_weight
    return LossWeights(args.adv_weight, args.ccl_weight, args.identity_weight, oml, getattr(args, 'dist_weight', 0.0))


def scheduled_weights(args, epoch_progress):
    """Weights at a point of training (fractional epochs done). During --warmup_epochs only the paired
    term is on; the other terms then ramp linearly to full weight over --rampup_epochs."""
    full = full_weights(args)
    if epoch_progress < args.warmup_epochs:
        ramp = 0.0
    elif args.rampup_epochs > 0:
        ramp = min(1.0, (epoch_progress - args.warmup_epochs) / args.rampup_epochs)
    else:
        ramp = 1.0
    return LossWeights(full.adv * ramp, full.ccl * ramp, full.identity * ramp, full.oml, full.dist * ramp)


def lazy_weights(weights, step, every):
    """--gan_every K: the adversarial, cycle and identity terms at K times their weight on steps 0, K, 2K, ...
    and off (not computed) on the others, so that they cost 1/K of their time for about the same mean gradient."""
    if every <= 1:
        return weights
    scale = 0.0 if step % every else float(every)
    return LossWeights(weights.adv * scale, weights.ccl * scale, weights.identity * scale, weights.oml,
                       weights.dist * scale)


def _bce_to(logits, target):
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def _l1(a, b):
    return F.l1_loss(a.float(), b.float())


def gan_part(gan_slices):
    """The slices of a batch the cycle, adversarial and discriminator terms use: the first N, or all for 0."""
    return slice(None, gan_slices or None)


def _run(generator, *batches):
    """One generator pass over several batches at once (instance norm is per image, so this equals
    separate passes), split back into the batches."""
    if len(batches) == 1:
        return (generator(batches[0]),)
    return torch.split(generator(torch.cat(batches)), [b.shape[0] for b in batches])


@dataclass(frozen=True)
class MatchingTargets:
    """For a batch of independently drawn slices: the other vendor's scan of each slice where there is one.
    target_B[i] is the vendor-B scan of real_A[i]'s slice where has_B[i]; target_A likewise for real_B."""
    target_B: torch.Tensor
    has_B: torch.Tensor
    target_A: torch.Tensor
    has_A: torch.Tensor


def _masked_l1(prediction, target, mask):
    """L1 over the batch items where mask is True; 0 when there are none, still tied to the prediction so that a
    step whose only term it is (warm-up, the paired steps of --gan_every) can run backward, with zero gradients."""
    if not bool(mask.any()):
        return prediction.float().sum() * 0.0
    return _l1(prediction[mask], target[mask])


def generator_losses(real_A, real_B, G_AB, G_BA, D_A, D_B, weights, real_label=1.0, gan_slices=0, matching=None):
    """Loss terms of one batch (unweighted, each a scalar tensor) and the fakes (None when not needed).

    real_A[i] and real_B[i] are a pair unless `matching` (MatchingTargets) says which true pairs the batch has.
    Runs each needed generator pass once: A->B and B->A fakes (with the identity passes batched
    into the same call), then the cycles.
    """
    zero = real_A.new_zeros((), dtype=torch.float32)
    terms = dict.fromkeys(TERMS, zero)
    need_fakes = bool(weights.adv or weights.ccl or weights.oml or weights.dist)
    fake_A = fake_B = None
    if need_fakes and weights.identity:
        fake_B, same_B = _run(G_AB, real_A, real_B)
        fake_A, same_A = _run(G_BA, real_B, real_A)
    elif need_fakes:
        fake_B, = _run(G_AB, real_A)
        fake_A, = _run(G_BA, real_B)
    elif weights.identity:
        same_B, = _run(G_AB, real_B)
        same_A, = _run(G_BA, real_A)
    if weights.identity:
        terms['Identity'] = _l1(same_B, real_B) + _l1(same_A, real_A)
    part = gan_part(gan_slices)
    if weights.adv:
        terms['Adversarial'] = _bce_to(D_B(fake_B[part]), real_label) + _bce_to(D_A(fake_A[part]), real_label)
    if weights.ccl:
        terms['Cycle'] = _l1(G_BA(fake_B[part]), real_A[part]) + _l1(G_AB(fake_A[part]), real_B[part])
    if weights.oml and matching is None:
        terms['Matching'] = _l1(fake_B, real_B) + _l1(fake_A, real_A)
    elif weights.oml:
        terms['Matching'] = (_masked_l1(fake_B, matching.target_B, matching.has_B)
                             + _masked_l1(fake_A, matching.target_A, matching.has_A))
    if weights.dist:
        terms['Distribution'] = (_sorted_foreground_l1(fake_B, real_A, real_B)
                                 + _sorted_foreground_l1(fake_A, real_B, real_A))
    return terms, fake_A, fake_B


def _sorted_foreground_l1(fake, source, real):
    """Mean |difference| of the sorted intensities of fake (where source is foreground) and of real (where it is
    foreground), the larger set taken at the smaller's quantiles: a 1-D Wasserstein distance, differentiable."""
    fake, real = fake.float()[source > -1], real.float()[real > -1]
    if not (fake.numel() and real.numel()):
        return source.new_zeros((), dtype=torch.float32)
    fake, real = torch.sort(fake).values, torch.sort(real).values
    n = min(len(fake), len(real))
    at = lambda values: values[torch.linspace(0, len(values) - 1, n, device=values.device).round().long()]  # noqa: E731
    return (at(fake) - at(real)).abs().mean()


def discriminator_loss(D, real, fake, real_label=1.0):
    """BCE(D(real), real) + BCE(D(fake), 0), fakes detached, both halves in one pass."""
    logits = D(torch.cat([real, fake.detach()]))
    logits_real, logits_fake = torch.split(logits, [real.shape[0], fake.shape[0]])
    return _bce_to(logits_real, real_label) + _bce_to(logits_fake, 0.0)
