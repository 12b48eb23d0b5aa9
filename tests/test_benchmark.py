"""The benchmark scripts on tiny inputs: benchmark.py, amp_precision.py, step_cost.py and second_shift.py."""
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from conftest import REPO, mni_t1
from utils.device import amp_description, resolve_amp


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


def test_amp_precision_variants_put_only_the_downsamplings_back_in_bfloat16():
    """benchmarks/amp_precision.py's variants change what they say: both downsamplings, or all but the first,
    autocast to bfloat16; the unchanged generator keeps both in float32. Run apart: the variants patch classes."""
    code = '''
import sys, torch
from benchmarks import amp_precision
from model.generator import Generator, Float32Conv2d
if sys.argv[1] != "as_is":
    amp_precision.autocast_downsamplings(keep_first_in_float32=sys.argv[1] == "first_only")
generator, dtypes = Generator(ngf=8, n_res_blocks=1), []
for layer in generator.model:
    if isinstance(layer, Float32Conv2d):
        layer.register_forward_hook(lambda m, i, o: dtypes.append(str(o.dtype).replace("torch.", "")))
with torch.autocast("cpu", torch.bfloat16):
    generator(torch.zeros(1, 1, 16, 16))
print(" ".join(dtypes))
'''
    want = {'as_is': 'float32 float32', 'first_only': 'float32 bfloat16', 'bf16_downsampling': 'bfloat16 bfloat16'}
    for variant, dtypes in want.items():
        done = subprocess.run([sys.executable, '-c', code, variant], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split() == dtypes.split(), variant
    done = subprocess.run([sys.executable, 'benchmarks/amp_precision.py', 'bogus'], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and 'usage' in done.stderr and 'Traceback' not in done.stderr


def test_step_cost_times_each_case_against_the_paired_step():
    argv = ['--ngf', '4', '--n_res_blocks', '1', '--ndf', '4', '--batch_size', '2', '--height', '24', '--width', '24',
            '--repeats', '1', '--gan_slices', '1', '--gan_every', '3', '--amp', 'auto']
    done = subprocess.run([sys.executable, 'benchmarks/step_cost.py', *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.endswith('x')]
    assert [' '.join(row[:-3]) for row in rows] == ['paired term only', 'CycleGAN, whole batch',
                                                    'CycleGAN, --gan_slices 1', 'paired + cycle, --gan_slices 1',
                                                    'paired + adversarial, --gan_slices 1',
                                                    'CycleGAN, --gan_slices 1, --gan_every 3']
    assert rows[0][-1] == '1.00x' and all(float(row[-3]) > 0 for row in rows)
    cpu = torch.device('cpu')  # the header names the precision --amp auto picks on this CPU
    assert f', {amp_description(resolve_amp("auto", cpu), cpu)}, ' in done.stdout.splitlines()[0]
    for bad, flag in ((['--batch_size', '0'], '--batch_size'), (['--device', 'cuda'], '--device')):
        done = subprocess.run([sys.executable, 'benchmarks/step_cost.py', *bad], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode != 0 and flag in done.stderr and 'Traceback' not in done.stderr


def test_second_shift_writes_a_pair_per_volume_and_refuses_to_replace_other_files(tmp_path):
    source = tmp_path / 'in'
    source.mkdir()
    template = mni_t1(4)
    data = np.asarray(template.dataobj)
    nib.save(nib.Nifti1Image(data, template.affine), source / 'a.nii.gz')
    nib.save(nib.Nifti1Image(data[::-1].copy(), template.affine), source / 'b.nii')
    out = tmp_path / 'out'

    def run(*flags):
        return subprocess.run([sys.executable, 'benchmarks/second_shift.py', '--input_dir', str(source),
                               '--output_dir', str(out), *flags], cwd=REPO, capture_output=True, text=True, timeout=120)
    done = run()
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ('a.nii.gz', 'b.nii'):
        first, second = nib.load(out / 'SIEMENS' / name), nib.load(out / 'Philips' / name)
        assert np.array_equal(np.asarray(first.dataobj), np.asarray(nib.load(source / name).dataobj))
        assert second.shape == first.shape and np.allclose(second.affine, first.affine)
        x, y = np.asarray(first.dataobj, dtype=np.float64), np.asarray(second.dataobj, dtype=np.float64)
        assert np.all(y[x == 0] == 0) and y.max() > 1000
        # the documented mapping: a gamma curve and a blur explain the new scan but for the bias field and noise
        model = ndimage.gaussian_filter(np.clip(x / np.percentile(x[x > 0], 99.5), 0, None) ** 1.5, 0.65)
        assert np.corrcoef(model[x > 0], y[x > 0])[0, 1] > 0.98
    before = (out / 'Philips' / 'a.nii.gz').read_bytes()
    done = run()  # exists, no --overwrite
    assert done.returncode != 0 and '--overwrite' in done.stderr and 'Traceback' not in done.stderr
    (out / 'notes.txt').write_text('mine')
    done = run('--overwrite')  # holds a file this script did not write
    assert done.returncode != 0 and 'choose another --output_dir' in done.stderr and 'Traceback' not in done.stderr
    assert (out / 'notes.txt').read_text() == 'mine' and (out / 'Philips' / 'a.nii.gz').read_bytes() == before
