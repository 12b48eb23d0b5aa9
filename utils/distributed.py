"""torch.distributed set-up for `torchrun` (NCCL on GPUs, gloo on the CPU); a plain `python` run is one process."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass
class ProcessGroupInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def setup_process_group(device_name):
    """Join the torchrun process group if WORLD_SIZE > 1; returns this process's rank info."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size <= 1:
        return ProcessGroupInfo()
    info = ProcessGroupInfo(int(os.environ['RANK']), world_size, int(os.environ.get('LOCAL_RANK', '0')))
    use_cuda = device_name in ('auto', 'cuda') and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend='nccl' if use_cuda else 'gloo')
    return info


def teardown_process_group():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor):
    """Sum a tensor over all processes (identity in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class ShardSampler(Sampler):
    """Every world_size-th index from rank: each sample exactly once over all processes (no padding),
    so sums over processes equal a single-process evaluation."""

    def __init__(self, length, rank, world_size):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)
