"""Time-to-quality options: bfloat16 autocast on the CPU, the CPU recipe file, the experiment drivers
experiments/quality.py (paired, unpaired and semi-paired modes), quality_seeds.py and nominal_clock.py, and the
split of paired scans into unpaired and semi-paired ones (dataset/split_demo.py)."""
import json
import os
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO, mni_t1, second_vendor, subject_volume
from dataset import split_demo
from experiments import nominal_clock, quality
from utils.arguments import parse_arguments
from utils.errors import run_cli
from utils.losses import scheduled_weights
from utils.trainer import CycleGANTrainer

TINY = ['--ngf', '8', '--n_res_blocks', '2', '--ndf', '8', '--num_workers', '0', '--device', 'cpu',
        '--batch_size', '2', '--lower_bound', '0.4', '--upper_bound', '0.6']


def test_amp_on_cpu_trains_with_finite_losses(pickle_dataset, tmp_path, monkeypatch):
    # On CPUs without bfloat16 instructions the same path runs on a slow kernel (fine for these tiny images).
    monkeypatch.setattr('utils.device.cpu_has_fast_bfloat16', lambda: True)
    args = parse_arguments(['-ex', 'amp', '--data_root', pickle_dataset, '--save_dir', str(tmp_path), '--amp', *TINY])
    trainer = CycleGANTrainer(args, torch.device('cpu'), str(tmp_path / 'amp'))
    before = [p.detach().clone() for p in trainer.nets['G_AB'].parameters()]
    real_A, real_B = next(iter(trainer.train_loader))
    conv_dtypes = set()
    trainer.nets['G_AB'].model[1].register_forward_hook(lambda module, inputs, out: conv_dtypes.add(out.dtype))
    for _ in range(3):
        loss_G, terms, loss_D, fake_A, fake_B = trainer.step(real_A, real_B, scheduled_weights(args, 0.0))
        assert torch.isfinite(loss_G) and torch.isfinite(loss_D)
        assert all(torch.isfinite(value) for value in terms.values())
    assert conv_dtypes == {torch.bfloat16}  # the passes really ran in reduced precision
    assert fake_B.dtype == torch.float32  # the last layer sums its taps in float32
    assert all(p.dtype == torch.float32 for p in trainer.nets['G_AB'].parameters())  # weights stay float32
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.nets['G_AB'].parameters()))


def test_cpu_recipe_is_a_cyclegan_recipe():
    """recipes/cpu.args parses, and its adversarial and cycle terms are on for at least the last third."""
    args = parse_arguments(['@' + os.path.join(REPO, 'recipes', 'cpu.args'), '-ex', 'x'])
    assert args.adv_weight > 0 and args.ccl_weight > 0 and args.oml_weight > 0
    for fraction in np.linspace(2 / 3, 1, 21)[1:]:
        weights = scheduled_weights(args, fraction * args.total_epoch)
        assert weights.adv > 0 and weights.ccl > 0, fraction
    # flags after the recipe override it
    assert parse_arguments(['@' + os.path.join(REPO, 'recipes', 'cpu.args'), '-ex', 'x', '--ngf', '12']).ngf == 12


@pytest.fixture(scope='module')
def vendor_folders(tmp_path_factory):
    """Six subjects of 6 mm NIfTI volumes per vendor."""
    root = tmp_path_factory.mktemp('vendors')
    template = mni_t1(6)
    base = np.asarray(template.dataobj, dtype=np.float32)
    for vendor in ('SIEMENS', 'Philips'):
        os.makedirs(root / vendor)
    for index in range(6):
        a = subject_volume(base, index)
        nib.save(nib.Nifti1Image(a, template.affine), root / 'SIEMENS' / f'subj_{index + 1:03d}.nii.gz')
        nib.save(nib.Nifti1Image(second_vendor(a, index), template.affine),
                 root / 'Philips' / f'subj_{index + 1:03d}.nii.gz')
    return root


def run_quality(*argv, cwd=REPO):
    return subprocess.run([sys.executable, os.path.join(REPO, 'experiments', 'quality.py'), *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_quality_script_prints_one_json_line(vendor_folders, tmp_path):
    """Started from another folder, with the data, the work folder and a recipe file given relative to it."""
    (tmp_path / 'tiny.args').write_text('\n'.join(TINY) + '\n')
    os.symlink(vendor_folders, tmp_path / 'data')
    result = run_quality('--minutes', '0.03', '--data_dir', 'data', '--work_dir', '.', '@tiny.args',
                         '--lower_bound', '0.3', '--upper_bound', '0.7', cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report['mode'] == 'paired'
    assert report['recipe_flags'][:2] == ['@tiny.args', '--lower_bound']
    (entry,) = report['results']
    assert entry['minutes'] == 0.03
    for method in ('recipe', 'paired_l1', 'unharmonized', 'histogram_matching'):
        assert {'SSIM', 'PSNR', 'MAE', 'Detail'} <= set(entry[method]), method
        assert 0 < entry[method]['SSIM'] <= 1 and entry[method]['PSNR'] > 0
    assert entry['recipe']['train_wall_s'] > 0 and entry['paired_l1']['train_wall_s'] > 0
    assert entry['recipe']['steps'] > 0 and entry['paired_l1']['steps'] > 0
    # steps and seconds come from train.py's summary.json: the seconds of training steps fill the budget
    for method in ('recipe', 'paired_l1'):
        assert 1.8 <= entry[method]['train_seconds'] <= entry[method]['train_wall_s']
    # fine detail as a ratio to the real scans' (inference_nii.py's Detail column): the second vendor here is a
    # blurred first, so the input has more of it than the target
    assert all(entry[method]['Detail'] > 0 for method in ('recipe', 'paired_l1', 'histogram_matching'))
    assert entry['unharmonized']['Detail'] > 1.2
    # the paired-L1 reference really trained without the other terms
    with open(tmp_path / 'runs' / 'paired_l1_0.03min' / 'arguments.txt') as f:
        paired = json.load(f)
    assert paired['adv_weight'] == paired['ccl_weight'] == paired['identity_weight'] == 0
    assert paired['ngf'] == 8


@pytest.mark.parametrize('argv, message', [
    (['--minutes', '0'], '--minutes must be positive'),
    (['--minutes', '-2'], '--minutes must be positive'),
    (['--minutes', '1', '--no_such_flag', '3'], 'unrecognized arguments: --no_such_flag'),
    (['--minutes', '1', '--ngf', 'wide'], "--ngf: invalid int value"),
    (['--minutes', '1', '--nominal_cost', '0.5'], '--nominal_cost must be at least 1'),
])
def test_quality_script_refuses_bad_input_before_training(argv, message, vendor_folders, tmp_path):
    result = run_quality(*argv, '--data_dir', str(vendor_folders), '--work_dir', str(tmp_path / 'work'))
    assert_refused_before_any_work(result, message, tmp_path / 'work')


def assert_refused_before_any_work(result, message, work_dir):
    """Exit code 2, a last line 'error: ...' with `message`, no traceback, nothing prepared or trained."""
    assert result.returncode == 2
    assert 'Traceback' not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('error:') and message in last
    assert not work_dir.exists()


def subjects_in(folder):
    return sorted(name.removesuffix('.nii.gz') for name in os.listdir(folder))


@pytest.mark.parametrize('mode, flags, training', [
    ('unpaired', [], {'SIEMENS': ['subj_001', 'subj_002'], 'Philips': ['subj_003', 'subj_004']}),
    ('semi', ['--pairs', '1'], {'SIEMENS': ['subj_001', 'subj_002', 'subj_003'], 'Philips': ['subj_001', 'subj_004']}),
])
def test_split_demo_disjoint_training_subjects_and_traveling_test(mode, flags, training, vendor_folders, tmp_path):
    """Six subjects: the last two are the test on both vendors; the rest are cut in half between the vendors, after
    the pair subjects, which go to both."""
    out = tmp_path / 'split'
    split_demo.main(['--mode', mode, '--input_dir', str(vendor_folders), '--output_dir', str(out), *flags])
    for vendor in ('SIEMENS', 'Philips'):
        assert subjects_in(out / vendor) == training[vendor]
        assert subjects_in(out / 'traveling' / vendor) == ['subj_005', 'subj_006']
        for path in [*(out / vendor).iterdir(), *(out / 'traveling' / vendor).iterdir()]:
            # copies (not links) of that vendor's scan
            assert not path.is_symlink() and path.read_bytes() == (vendor_folders / vendor / path.name).read_bytes()
    both = set(subjects_in(out / 'SIEMENS')) & set(subjects_in(out / 'Philips'))
    assert both == ({'subj_001'} if mode == 'semi' else set())


def test_split_demo_replaces_an_earlier_split_only_with_overwrite(vendor_folders, tmp_path, capsys):
    out = tmp_path / 'split'
    argv = ['--mode', 'unpaired', '--input_dir', str(vendor_folders), '--output_dir', str(out), '--traveling', '1']
    split_demo.main(argv)
    (out / 'SIEMENS' / 'stale.nii.gz').write_bytes(b'old')
    (out / 'dataset').mkdir()  # not the split's: stays
    with pytest.raises(SystemExit) as exit_:
        run_cli(split_demo.main, argv)
    assert exit_.value.code == 2
    assert 'already holds SIEMENS, Philips, traveling/SIEMENS, traveling/Philips' in capsys.readouterr().err
    assert (out / 'SIEMENS' / 'stale.nii.gz').exists()
    split_demo.main([*argv, '--overwrite'])
    assert subjects_in(out / 'SIEMENS') == ['subj_001', 'subj_002', 'subj_003']
    assert subjects_in(out / 'traveling' / 'Philips') == ['subj_006']
    assert (out / 'dataset').is_dir()


def test_makefile_demo_unpaired_uses_the_split_its_comment_describes():
    """make demo-unpaired: SIEMENS scans of subjects 1-5, Philips scans of 6-10, 11 and 12 the test."""
    with open(os.path.join(REPO, 'Makefile')) as f:
        assert 'dataset/split_demo.py --mode unpaired --input_dir $(DEMO)/nifti --output_dir $(UNPAIRED)' in f.read()
    plan = split_demo.plan_split([f'subj_{i:03d}' for i in range(12, 0, -1)], 'unpaired')
    assert plan['SIEMENS'] == [f'subj_{i:03d}' for i in range(1, 6)]
    assert plan['Philips'] == [f'subj_{i:03d}' for i in range(6, 11)]
    assert plan['traveling/SIEMENS'] == plan['traveling/Philips'] == ['subj_011', 'subj_012']
    # names sort by their numbers, so unpadded ones split the same way
    assert split_demo.plan_split([f's{i}' for i in range(1, 13)], 'unpaired')['traveling/SIEMENS'] == ['s11', 's12']


def assert_one_line_error(exit_, capsys, message):
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error:') and message in err[0], err


@pytest.mark.parametrize('flags, message', [
    (['--traveling', '5'], '--traveling 5 leaves 1 of the 6 subjects for single-vendor training'),
    (['--traveling', '0'], '--traveling 0: at least one subject must be held out'),
    (['--mode', 'semi', '--traveling', '3'], '--traveling 3 and --pairs 2 leave 1 of the 6 subjects'),
    (['--mode', 'semi', '--pairs', '0'], '--pairs 0: --mode semi needs at least one subject'),
    (['--pairs', '1'], '--pairs is for --mode semi'),
])
def test_split_demo_refuses_bad_values(flags, message, vendor_folders, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(split_demo.main, ['--mode', 'unpaired', '--input_dir', str(vendor_folders),
                                  '--output_dir', str(tmp_path / 'split'), *flags])
    assert_one_line_error(exit_, capsys, message)
    assert not (tmp_path / 'split').exists()


def test_split_demo_refuses_subjects_on_one_vendor_and_its_own_folders(vendor_folders, tmp_path, capsys):
    import shutil
    data = tmp_path / 'data'
    shutil.copytree(vendor_folders, data)
    os.remove(data / 'Philips' / 'subj_004.nii.gz')
    for input_dir, output_dir, message in [
            (data, tmp_path / 'split', 'subj_004 is in SIEMENS/ but not in Philips/; every subject must be scanned'),
            (data / 'SIEMENS', tmp_path / 'split', f'--input_dir {data / "SIEMENS"} has no SIEMENS/ folder'),
            (vendor_folders, vendor_folders, 'would hold the split in --input_dir')]:
        with pytest.raises(SystemExit) as exit_:
            run_cli(split_demo.main, ['--mode', 'unpaired', '--input_dir', str(input_dir),
                                      '--output_dir', str(output_dir), '--overwrite'])
        assert_one_line_error(exit_, capsys, message)
    assert not (tmp_path / 'split').exists()
    assert subjects_in(vendor_folders / 'SIEMENS') == [f'subj_{i:03d}' for i in range(1, 7)]


@pytest.mark.parametrize('flags, message', [
    (['--mode', 'unpaired', '--traveling', '5'], '--traveling 5 leaves 1 of the 6 subjects'),
    (['--mode', 'semi', '--subjects', '5', 'demo'], '--traveling 2 and --pairs 2 leave 1 of the 5 subjects'),
    (['--traveling', '1'], '--traveling is for --mode unpaired or semi, not --mode paired'),
    (['--mode', 'unpaired', '--pairs', '1'], '--pairs is for --mode semi, not --mode unpaired'),
    (['--mode', 'semi', '--paired_recipe', 'no_such.args'], 'no_such.args: no such file; give a train.py flag file'),
])
def test_quality_modes_refuse_bad_values_before_any_work(flags, message, vendor_folders, tmp_path, capsys):
    """In this process; the demo data (no --data_dir) is not built for a split it cannot give."""
    data = [] if 'demo' in flags else ['--data_dir', str(vendor_folders)]
    flags = [flag for flag in flags if flag != 'demo']
    with pytest.raises(SystemExit) as exit_:
        run_cli(quality.main, ['--minutes', '0.03', *data, '--work_dir', str(tmp_path / 'work'), *flags, *TINY])
    assert_one_line_error(exit_, capsys, message)
    assert not (tmp_path / 'work').exists()


def test_a_recipe_right_after_the_time_budgets_is_passed_to_train_py():
    """The documented form `--minutes 10 @recipe` (argparse alone would read the recipe as a time budget); flags
    quality.py does not know follow the recipe, so they override it."""
    args, train_flags = quality.split_arguments(['--mode', 'unpaired', '--minutes', '2', '5', '@recipes/cpu_unpaired.args',
                                                 '--adv_weight', '0.2'])
    assert args.minutes == [2.0, 5.0] and args.mode == 'unpaired'
    assert train_flags == ['@recipes/cpu_unpaired.args', '--adv_weight', '0.2']


@pytest.mark.slow
def test_quality_semi_mode_against_the_pairs_alone(vendor_folders, tmp_path, capsys):
    """Six subjects: 1 and 2 on both vendors, 3 on SIEMENS, 4 on Philips train; 5 and 6 are the test. The recipe
    trains on all of it, the paired model (--paired_recipe) on 1 and 2 alone; both are scored on 5 and 6 beside
    Nyul and histogram matching fitted on the Philips training scans."""
    (tmp_path / 'tiny.args').write_text('\n'.join(TINY) + '\n')
    work = tmp_path / 'work'
    quality.main(['--mode', 'semi', '--minutes', '0.03', '--data_dir', str(vendor_folders), '--work_dir', str(work),
                  '--paired_recipe', str(tmp_path / 'tiny.args'), *TINY])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report['mode'] == 'semi'
    assert report['split'] == {'SIEMENS': ['subj_001', 'subj_002', 'subj_003'],
                               'Philips': ['subj_001', 'subj_002', 'subj_004'],
                               'traveling/SIEMENS': ['subj_005', 'subj_006'],
                               'traveling/Philips': ['subj_005', 'subj_006']}
    (entry,) = report['results']
    for method in ('recipe', 'pairs_only', 'unharmonized', 'Nyul', 'N4_Nyul', 'histogram_matching_to_target'):
        assert 0 < entry[method]['SSIM'] <= 1 and entry[method]['PSNR'] > 0 and entry[method]['MAE'] > 0, method
        assert 0 <= entry[method]['vendor_classifier'] <= 1 and 0 < entry[method]['tissue_Dice'] <= 1, method
    assert entry['recipe']['steps'] > 0 and entry['pairs_only']['steps'] > 0
    # both baselines are fitted on the Philips training scans, so their intensities lie closer to that vendor's
    for method in ('Nyul', 'histogram_matching_to_target'):
        assert entry[method]['vendor_distance'] < entry['unharmonized']['vendor_distance'] / 3, method
    # the recipe trained on the pairs and the single-vendor scans, the reference on the pairs alone
    with open(work / 'dataset' / 'dataset_info.json') as f:
        info = json.load(f)
    assert info['paired_subjects'] == ['subj_001', 'subj_002'] and set(info['subject_scales']) == {
        'subj_001', 'subj_002', 'subj_003', 'subj_004'}
    with open(work / 'pairs_only' / 'dataset' / 'dataset_info.json') as f:
        info = json.load(f)
    assert info['paired_subjects'] == sorted(info['subject_scales']) == ['subj_001', 'subj_002']
    with open(work / 'runs' / 'pairs_only_0.03min' / 'arguments.txt') as f:
        paired = json.load(f)
    assert paired['data_root'] == str(work / 'pairs_only' / 'dataset') and paired['ngf'] == 8
    # scored on the traveling subjects only
    table = pd.read_csv(work / 'runs' / 'recipe_0.03min' / 'testset' / 'SIEMENS_to_Philips' / 'metrics.csv')
    assert sorted(set(table['volume'])) == ['mean', 'subj_005', 'subj_006']


def run_nominal_clock(pickle_dataset, save_dir, cost, *flags):
    """experiments/nominal_clock.py in this process; returns the steps summary.json counts and G_AB's weights."""
    nominal_clock.main([str(cost), *TINY, '-ex', 'n', '--data_root', pickle_dataset, '--save_dir', str(save_dir),
                        '--max_minutes', '0.011', '--total_epoch', '2', '--decay_epoch', '1', *flags])
    with open(save_dir / 'n' / 'summary.json') as f:
        summary = json.load(f)
    assert summary['last_epoch'] == 1
    # the last epoch's eval metrics as loss.csv logged them, and the best epochs as model/best.json
    logged = pd.read_csv(save_dir / 'n' / 'loss' / 'loss.csv').iloc[-1]
    for direction in ('A2B', 'B2A'):
        assert summary['eval'][direction]['ssim'] == pytest.approx(logged[f'Eval SSIM {direction}'])
        assert summary['eval'][direction]['psnr'] == pytest.approx(logged[f'Eval PSNR {direction}'])
    with open(save_dir / 'n' / 'model' / 'best.json') as f:
        assert summary['best'] == json.load(f)
    assert 0.66 <= summary['train_seconds'] < 0.66 + 0.2 * cost  # nominal seconds: the budget and part of a step
    state = torch.load(save_dir / 'n' / 'model' / 'last.pth', weights_only=True)
    return summary['steps_this_run'], state['networks']['G_AB']


@pytest.mark.parametrize('cost, flags, steps', [
    (1.5, ['--adv_weight', '0', '--ccl_weight', '0', '--identity_weight', '0'], 4),  # paired steps: 0.2 s each
    (1.5, [], 3),  # CycleGAN steps: 0.3 s each
    (2.0, [], 2),
])
def test_nominal_clock_counts_step_costs_and_repeats_exactly(pickle_dataset, tmp_path, cost, flags, steps):
    """0.66 s of nominal clock (--max_minutes 0.011) hold as many steps as their costs allow, whatever the wall
    time; a second run gives the same weights bit for bit."""
    first, weights = run_nominal_clock(pickle_dataset, tmp_path / 'a', cost, *flags)
    again, weights_again = run_nominal_clock(pickle_dataset, tmp_path / 'b', cost, *flags)
    assert first == again == steps
    assert all(torch.equal(weights[key], weights_again[key]) for key in weights)


def test_nominal_clock_refuses_a_cost_below_one(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(nominal_clock.main, ['0.5', '-ex', 'n', '--save_dir', str(tmp_path / 'runs')])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith('error: COST 0.5 must be a number of at least 1')
    assert not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('fast', [True, False])
def test_amp_modes(fast, monkeypatch):
    """off never autocasts; on autocasts where bfloat16 is fast and is an error elsewhere; auto follows the CPU."""
    from utils.device import resolve_amp
    from utils.errors import UserError
    monkeypatch.setattr('utils.device.cpu_has_fast_bfloat16', lambda: fast)
    cpu = torch.device('cpu')
    assert resolve_amp('off', cpu) is False
    assert resolve_amp('auto', cpu) is fast
    if fast:
        assert resolve_amp('on', cpu) is True
    else:
        with pytest.raises(UserError, match='--amp auto'):
            resolve_amp('on', cpu)
    assert parse_arguments(['-ex', 'x', '--amp']).amp == 'on'
    assert parse_arguments(['-ex', 'x']).amp == 'off'
    assert parse_arguments(['-ex', 'x', '--amp', 'auto']).amp == 'auto'


# quality_seeds.py pins its runs to CPUs, which Linux allows and macOS does not
PINNABLE_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_setaffinity') else 0
side_by_side = pytest.mark.skipif(PINNABLE_CPUS < 2, reason='runs two trainings side by side, each pinned to a CPU')


def run_quality_seeds(*argv, cwd=REPO):
    return subprocess.run([sys.executable, os.path.join(REPO, 'experiments', 'quality_seeds.py'), *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@side_by_side
def test_quality_seeds_runs_recipe_and_paired_side_by_side(vendor_folders, tmp_path):
    """Started from another folder, with a recipe file and a work folder given relative to it."""
    tiny = [flag for flag in TINY if flag not in ('--device', 'cpu')]  # the script itself must pick the CPU
    (tmp_path / 'tiny.args').write_text('\n'.join(tiny) + '\n')
    result = run_quality_seeds('--minutes', '0.03', '--seeds', '5', '--cores_per_job', '1', '--data_dir',
                               str(vendor_folders), '--work_dir', 'work', '@tiny.args', '--ccl_weight', '0.5',
                               '--device', 'auto', cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report['recipe_flags'] == ['@tiny.args', '--ccl_weight', '0.5', '--device', 'auto']
    (row,) = report['seeds']
    assert row['seed'] == 5
    for kind in ('recipe', 'paired_l1'):
        assert 0 < row[kind]['SSIM'] <= 1 and row[kind]['steps'] > 0
    assert abs(row['difference']['SSIM'] - (row['recipe']['SSIM'] - row['paired_l1']['SSIM'])) < 1e-12
    assert report['mean_difference'] == row['difference']
    assert 0 < report['histogram_matching']['SSIM'] <= 1
    # each run trained with its seed on the CPU, the paired one without the other terms
    work = tmp_path / 'work'
    with open(work / 'seed5_recipe' / 'runs' / 'recipe_0.03min' / 'arguments.txt') as f:
        recipe = json.load(f)
    with open(work / 'seed5_paired_l1' / 'runs' / 'paired_l1_0.03min' / 'arguments.txt') as f:
        paired = json.load(f)
    assert recipe['random_seed'] == paired['random_seed'] == 5
    assert recipe['device'] == paired['device'] == 'cpu'
    assert recipe['ngf'] == paired['ngf'] == 8
    assert recipe['ccl_weight'] == 0.5 and paired['ccl_weight'] == paired['adv_weight'] == 0


@side_by_side
def test_start_pinned_gives_the_run_its_cpus_and_as_many_threads(tmp_path, monkeypatch):
    from experiments.quality_seeds import start_pinned
    monkeypatch.setenv('OMP_NUM_THREADS', '7')
    cpus = sorted(os.sched_getaffinity(0))[-1:]
    code = 'import os; print(sorted(os.sched_getaffinity(0)), os.environ["OMP_NUM_THREADS"])'
    process = start_pinned([sys.executable, '-c', code], cpus, tmp_path / 'log')
    assert process.wait(timeout=60) == 0
    assert (tmp_path / 'log').read_text().strip() == f'{cpus} 1'


@side_by_side
def test_quality_seeds_stops_its_runs_when_killed(vendor_folders, tmp_path):
    """The runs are in sessions of their own; a SIGTERM to the script must still end them and their train.py."""
    import signal
    work = tmp_path / 'work'
    process = subprocess.Popen([sys.executable, 'experiments/quality_seeds.py', '--minutes', '5', '--seeds', '1',
                                '--cores_per_job', '1', '--data_dir', str(vendor_folders), '--work_dir', str(work),
                                *TINY], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert 'runs of 5 minutes started' in process.stdout.readline()
    time.sleep(3)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143

    def runs_alive():
        alive = []
        for pid in filter(str.isdigit, os.listdir('/proc')):
            try:
                with open(f'/proc/{pid}/cmdline', 'rb') as f:
                    if str(work).encode() in f.read():
                        alive.append(pid)
            except OSError:  # ended meanwhile
                pass
        return alive
    deadline = time.monotonic() + 5  # a signalled train.py may still be exiting; a run left running lasts minutes
    while runs_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert runs_alive() == []


@side_by_side
def test_quality_seeds_names_the_log_of_a_failed_run(tmp_path):
    for vendor in ('SIEMENS', 'Philips'):
        (tmp_path / 'data' / vendor).mkdir(parents=True)  # no volumes: the dataset step fails
    result = run_quality_seeds('--seeds', '1', '--cores_per_job', '1', '--data_dir', str(tmp_path / 'data'),
                               '--work_dir', str(tmp_path / 'work'))
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('error: a run failed, see ') and 'quality.log' in last


@pytest.mark.parametrize('argv, message', [
    pytest.param(['--seeds', '1', '2', '--cores_per_job', '4096'], '4 runs x 4096 CPUs need 16384 CPUs',
                 marks=pytest.mark.skipif(PINNABLE_CPUS < 1, reason='pinning to CPUs needs Linux')),
    (['--seeds', '1', '1'], '--seeds has repeats'),
    (['--seeds', '-1'], '--seeds must be between 0 and 2**32 - 1'),
    (['--random_seed', '3'], 'list the seeds in --seeds'),
    (['--random_seed=3'], 'list the seeds in --seeds'),
    (['--cores_per_job', '0'], '--cores_per_job must be at least 1'),
    (['--minutes', '0'], '--minutes must be positive'),
    (['--no_such_flag', '3'], 'unrecognized arguments: --no_such_flag'),
])
def test_quality_seeds_refuses_bad_input_before_any_run(argv, message, vendor_folders, tmp_path):
    result = run_quality_seeds(*argv, '--data_dir', str(vendor_folders), '--work_dir', str(tmp_path / 'work'))
    assert_refused_before_any_work(result, message, tmp_path / 'work')


def test_quality_seeds_names_a_data_dir_without_vendor_folders(tmp_path):
    result = run_quality_seeds('--data_dir', str(tmp_path), '--work_dir', str(tmp_path / 'work'))
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert f'{tmp_path} has no SIEMENS/ folder' in result.stderr.strip().splitlines()[-1]
