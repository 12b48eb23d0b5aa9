"""benchmarks/benchmark.py on tiny sizes: the figures the issue names, in one JSON last line, and what it skipped."""
import json
import subprocess
import sys

import torch

from conftest import REPO


def test_benchmark_prints_the_figures_and_what_it_skipped():
    argv = ['--quick', '--device', 'cpu', '--image_size', '32', '--train_sizes', 'cpu', '--infer_sizes', 'cpu',
            '--infer_batch', '4', '--single_slices', '2', '--repeats', '1', '--matmul_size', '256', '--amp']
    done = subprocess.run([sys.executable, 'benchmarks/benchmark.py', *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for figure in ('train_step_speedup', 'batched_inference_speedup', 'matmul_fraction', 'train_samples_per_s',
                   'inference_slices_per_s'):
        assert result[figure] > 0, figure
    assert result['device'] == 'cpu'
    assert result['forward_gflop_per_slice']['cpu'] > 0
    # the ratios are the ratios of the rates printed next to them
    assert abs(result['train_step_speedup'] - result['train_samples_per_s'] / result['reference_train_samples_per_s']) < 1e-6
    assert abs(result['batched_inference_speedup']
               - result['inference_slices_per_s'] / result['single_slices_per_s']) < 1e-6
    if not torch.cuda.is_available():
        assert any(line.startswith('CUDA: not present') for line in result['skipped'])
        assert 'CUDA: not present' in done.stdout
    from utils.device import cpu_has_fast_bfloat16
    if cpu_has_fast_bfloat16():
        assert 'amp' in result
    else:  # --amp asked for, and said out loud that it was skipped
        assert any(line.startswith('--amp') for line in result['skipped']) and 'amp' not in result
