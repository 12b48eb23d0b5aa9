"""torchrun training on 2 CPU processes (gloo), exact resume, and a run killed mid-epoch."""
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from conftest import REPO, tiny_train_flags
from model.generator import Generator
from utils.arguments import parse_arguments
from utils.trainer import CycleGANTrainer

FEW_SLICES = ['--lower_bound', '0.45', '--upper_bound', '0.55']


ONE_THREAD = {**os.environ, 'OMP_NUM_THREADS': '1'}  # tiny networks: two threads spin on a loaded 2-core machine


def train(args, cwd=REPO, timeout=300):
    return subprocess.run([sys.executable, 'train.py', *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=ONE_THREAD)


def generator_weights(path):
    """The state_dict of a network file (a generator's file holds it next to the generator's configuration)."""
    saved = torch.load(path, map_location='cpu', weights_only=True)
    return saved.get('state_dict', saved)


def test_torchrun_two_cpu_processes(pickle_dataset, tmp_path):
    save_dir = tmp_path / 'results'
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
               '-ex', 'ddp', '--data_root', pickle_dataset, '--save_dir', str(save_dir), *tiny_train_flags(), *FEW_SLICES,
               '--batch_size', '2']
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-2000:]
    # rank 0 alone prints and writes; both processes' weights were compared at the end of training
    assert result.stdout.count('done after epoch 2') == 1
    assert 'identical on all 2 processes' in result.stdout
    experiment = save_dir / 'ddp'
    table = pd.read_csv(experiment / 'loss' / 'loss.csv')
    assert list(table['epoch']) == [1, 2]

    # the logged eval metrics equal a single-process evaluation of the saved weights
    args = parse_arguments(['-ex', 'single', '--data_root', pickle_dataset, '--save_dir', str(tmp_path / 'single'),
                            *tiny_train_flags(), *FEW_SLICES])
    trainer = CycleGANTrainer(args, torch.device('cpu'), str(tmp_path / 'single' / 'single'))
    trainer.nets['G_AB'].load_state_dict(generator_weights(experiment / 'model' / 'netG_S_to_P_epoch_2.pth'))
    trainer.nets['G_BA'].load_state_dict(generator_weights(experiment / 'model' / 'netG_P_to_S_epoch_2.pth'))
    trainer.nets['D_A'].load_state_dict(generator_weights(experiment / 'model' / 'netD_S_epoch_2.pth'))
    trainer.nets['D_B'].load_state_dict(generator_weights(experiment / 'model' / 'netD_P_epoch_2.pth'))
    losses, metrics = trainer.eval_epoch(2)
    last = table.iloc[-1]
    assert last['Eval SSIM A2B'] == pytest.approx(metrics['A2B'].ssim, rel=1e-4)
    assert last['Eval PSNR A2B'] == pytest.approx(metrics['A2B'].psnr, rel=1e-4)
    assert last['Eval SSIM B2A'] == pytest.approx(metrics['B2A'].ssim, rel=1e-4)
    assert last['Eval PSNR B2A'] == pytest.approx(metrics['B2A'].psnr, rel=1e-4)
    assert last['Eval Total'] == pytest.approx(losses['Total'], rel=1e-3)


def test_resume_gives_the_same_weights_as_a_straight_run(pickle_dataset, tmp_path):
    common = ['--data_root', pickle_dataset, '--save_dir', str(tmp_path), *tiny_train_flags(total_epoch=4, decay_epoch=2),
              *FEW_SLICES]
    straight = train(['-ex', 'straight', *common])
    assert straight.returncode == 0, straight.stderr[-2000:]
    first = train(['-ex', 'split', *common, '--stop_after_epoch', '2'])
    assert first.returncode == 0, first.stderr[-2000:]
    assert list(pd.read_csv(tmp_path / 'split' / 'loss' / 'loss.csv')['epoch']) == [1, 2]
    second = train(['-ex', 'split', *common, '--resume'])
    assert second.returncode == 0, second.stderr[-2000:]
    assert list(pd.read_csv(tmp_path / 'split' / 'loss' / 'loss.csv')['epoch']) == [1, 2, 3, 4]
    for name in ('netG_S_to_P_epoch_4.pth', 'netG_P_to_S_epoch_4.pth', 'netD_S_epoch_4.pth', 'netD_P_epoch_4.pth'):
        a = generator_weights(tmp_path / 'straight' / 'model' / name)
        b = generator_weights(tmp_path / 'split' / 'model' / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name

    # a finished run is extended by a larger --total_epoch
    more = train(['-ex', 'split', *common[:-len(FEW_SLICES)], *FEW_SLICES, '--resume', '--total_epoch', '5'])
    assert more.returncode == 0, more.stderr[-2000:]
    assert list(pd.read_csv(tmp_path / 'split' / 'loss' / 'loss.csv')['epoch']) == [1, 2, 3, 4, 5]


def test_killed_run_resumes_and_finishes(pickle_dataset, tmp_path):
    args = ['-ex', 'killed', '--data_root', pickle_dataset, '--save_dir', str(tmp_path),
            *tiny_train_flags(total_epoch=4, decay_epoch=2), '--lower_bound', '0.3', '--upper_bound', '0.7']
    process = subprocess.Popen([sys.executable, 'train.py', *args], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=ONE_THREAD)
    last_state = tmp_path / 'killed' / 'model' / 'last.pth'
    deadline = time.time() + 240
    while not last_state.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # now inside epoch 2
    assert process.poll() is None, 'training ended before it could be killed; use more slices'
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = train([*args, '--resume'])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    table = pd.read_csv(tmp_path / 'killed' / 'loss' / 'loss.csv')
    assert list(table['epoch']) == [1, 2, 3, 4]
    generator = Generator(ngf=8, n_res_blocks=2)
    generator.load_state_dict(generator_weights(tmp_path / 'killed' / 'model' / 'netG_S_to_P_epoch_4.pth'))
    assert not list(tmp_path.glob('killed/model/*.tmp'))


def test_resume_refuses_missing_state_and_changed_networks(pickle_dataset, tmp_path):
    args = ['-ex', 'r', '--data_root', pickle_dataset, '--save_dir', str(tmp_path), *tiny_train_flags(), *FEW_SLICES]
    missing = train([*args, '--resume'])
    assert missing.returncode == 2
    assert 'last.pth not found' in missing.stderr and 'Traceback' not in missing.stderr
    assert train(args).returncode == 0
    before = {p: p.read_bytes() for p in (tmp_path / 'r').rglob('*') if p.is_file()}
    changed = train([*args, '--resume', '--total_epoch', '3', '--ngf', '16'])
    assert changed.returncode == 2
    assert '--ngf 16 differs from 8' in changed.stderr and 'Traceback' not in changed.stderr
    after = {p: p.read_bytes() for p in (tmp_path / 'r').rglob('*') if p.is_file()}
    assert before == after
