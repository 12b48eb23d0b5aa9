"""utils.cpu_memory.keep_freed_memory: large CPU tensors reuse freed memory instead of new pages."""
import subprocess
import sys

import pytest


# Allocate, fill and free a 64 MiB tensor (a batch of generator activations) 16 times; print the page faults
# of the last 4 rounds (glibc places PyTorch's 64-byte-aligned blocks in fresh heap for the first few rounds).
PROGRAM = '''
import resource, torch
from utils.cpu_memory import keep_freed_memory
took = keep_freed_memory() if {keep} else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(12):
    torch.empty(16 << 20).fill_(1.0)
before = faults()
for _ in range(4):
    torch.empty(16 << 20).fill_(1.0)
print(took, faults() - before)
'''


def page_faults(keep):
    out = subprocess.run([sys.executable, '-c', PROGRAM.format(keep=keep)], capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc settings')
def test_freed_tensors_are_reused_without_new_page_faults():
    took, with_setting = page_faults(keep=True)
    _, without = page_faults(keep=False)
    assert took == 'True'
    pages = 4 * (64 << 20) // 4096  # four rounds of 64 MiB in 4 KiB pages
    assert without > pages // 2, without  # glibc maps each large block anew: every page faults again
    assert with_setting < pages // 20, with_setting  # the heap keeps the block: (almost) no new faults
