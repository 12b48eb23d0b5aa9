"""train.py with a clock that counts nominal step costs instead of wall time, for repeatable time-budget runs.

    python experiments/nominal_clock.py COST [train.py flags, with --max_minutes M]

Each paired step (the adversarial and cycle terms off) advances the clock by 0.2 s, each step that computes
them by COST x 0.2 s (benchmarks/step_cost.py measures COST for a recipe), whatever the machine is doing.
--max_minutes 2 is then 600 paired steps. A timed recipe and its paired-L1 reference then share their warm-up
bit for bit, a rerun repeats exactly, and several runs can share a CPU: the comparison is free of timing
noise and of the chaos that a different step count brings at a high learning rate. experiments/quality.py
--nominal_cost COST runs its trainings through this script.
"""
import train
from utils.errors import UserError, run_cli

PAIRED_STEP_SECONDS = 0.2


class NominalClock:
    """A trainer clock (utils.trainer.WallClock's methods) that advances by each step's nominal cost only."""

    def __init__(self, cycle_gan_cost):
        self.cycle_gan_cost = cycle_gan_cost
        self.seconds = 0.0

    def now(self):
        return self.seconds

    def step_done(self, weights):
        self.seconds += PAIRED_STEP_SECONDS * (self.cycle_gan_cost if (weights.adv or weights.ccl) else 1.0)


def main(argv):
    try:
        cost = float(argv[0])
    except (IndexError, ValueError):
        raise UserError('usage: nominal_clock.py COST [train.py flags]: COST, the cost of a CycleGAN step '
                        'relative to a paired one, is a number such as 1.85') from None
    if not cost >= 1:
        raise UserError(f'COST {argv[0]} must be a number of at least 1 (a CycleGAN step costs more than a paired one)')
    train.main(argv[1:], clock=NominalClock(cost))


if __name__ == '__main__':
    run_cli(main)
