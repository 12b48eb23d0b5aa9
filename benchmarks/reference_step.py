"""The original code's training step, frozen: what benchmarks/benchmark.py compares CycleGANTrainer.step with.

Each generator pass runs on its own; the discriminators are not frozen during the generator step; the
discriminator step re-runs G_AB(A) and G_BA(B) without detach, scores real and fake separately, and its
backward goes through both generators (whose gradients are then unused). Do not "fix" it: it is the baseline.
"""
import torch
import torch.nn.functional as F

from utils.device import autocast
from utils.trainer import set_requires_grad


def bce_to(logits, target):
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def l1(a, b):
    return F.l1_loss(a.float(), b.float())


def reference_step(nets, optimizer_G, optimizer_D, scaler, real_A, real_B, weights, real_label, device, amp):
    """One step of the original code on the trainer's networks, optimizers and grad scaler."""
    G_AB, G_BA, D_A, D_B = nets['G_AB'], nets['G_BA'], nets['D_A'], nets['D_B']
    set_requires_grad([D_A, D_B], True)  # the original never froze them
    with autocast(device, amp):
        fake_B, fake_A = G_AB(real_A), G_BA(real_B)
        adversarial = bce_to(D_B(fake_B), real_label) + bce_to(D_A(fake_A), real_label)
        cycle = l1(G_BA(fake_B), real_A) + l1(G_AB(fake_A), real_B)
        identity = l1(G_AB(real_B), real_B) + l1(G_BA(real_A), real_A)
        matching = l1(fake_B, real_B) + l1(fake_A, real_A)
        loss_G = (weights.adv * adversarial + weights.ccl * cycle + weights.identity * identity
                  + weights.oml * matching)
    optimizer_G.zero_grad(set_to_none=True)
    scaler.scale(loss_G).backward()
    scaler.step(optimizer_G)
    with autocast(device, amp):
        fake_B, fake_A = G_AB(real_A), G_BA(real_B)
        loss_D = (bce_to(D_A(real_A), real_label) + bce_to(D_A(fake_A), 0.0)
                  + bce_to(D_B(real_B), real_label) + bce_to(D_B(fake_B), 0.0))
    optimizer_D.zero_grad(set_to_none=True)
    scaler.scale(loss_D).backward()
    scaler.step(optimizer_D)
    scaler.update()
