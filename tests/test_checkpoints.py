"""Generator checkpoints carry their configuration: files from before and after that change both harmonize a
volume, resume checks every architecture flag, and the benchmark builds the recipe's networks."""
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

import inference_nii
import train
from conftest import REPO, mni_t1, tiny_train_flags
from model.discriminator import Discriminator
from model.generator import Generator, generator_config
from utils.arguments import parse_arguments
from utils.checkpoint import atomic_save, generator_checkpoint, load_generator_checkpoint
from utils.errors import UserError
from utils.trainer import CycleGANTrainer

NETWORK = ['--ngf', '8', '--n_res_blocks', '1']


def write_experiment(root, name, arguments, checkpoint):
    """An experiment folder as train.py leaves it, with one S->P generator file (epoch 1)."""
    experiment_dir = root / name
    (experiment_dir / 'model').mkdir(parents=True)
    with open(experiment_dir / 'arguments.txt', 'w') as f:
        json.dump(arguments, f)
    torch.save(checkpoint, experiment_dir / 'model' / 'netG_S_to_P_epoch_1.pth')
    return experiment_dir


def seeded_generator(seed, **config):
    torch.manual_seed(seed)
    return Generator(**config).eval()


@pytest.fixture
def one_volume(tmp_path):
    folder = tmp_path / 'input'
    folder.mkdir()
    template = mni_t1(6)
    nib.save(nib.Nifti1Image(1000 * np.asarray(template.dataobj), template.affine), folder / 'subj.nii.gz')
    return folder


def harmonize(root, name, input_dir, output_dir):
    with pytest.warns(UserWarning, match='dataset_info.json'):  # no intensity scale: outputs stay in [0, 1]
        failed = inference_nii.main(str(input_dir), str(output_dir), experiment=name, epoch=1, results_root=str(root),
                                    device='cpu')
    assert failed == []
    return np.asarray(nib.load(output_dir / 'subj_harmonized.nii.gz').dataobj)


def expected_output(generator, input_dir):
    _, output, _, _ = inference_nii.harmonize_volume(generator, str(input_dir / 'subj.nii.gz'), None, 16,
                                                     torch.device('cpu'))
    return output


def test_checkpoints_from_before_and_after_the_change_both_harmonize_a_volume(tmp_path, one_volume):
    arguments = vars(parse_arguments(['-ex', 'x', *NETWORK]))
    # before: a plain state_dict, and an arguments.txt written before --input_skip existed
    older = {key: value for key, value in arguments.items() if key != 'input_skip'}
    before = seeded_generator(0, ngf=8, n_res_blocks=1)
    write_experiment(tmp_path, 'before', older, before.state_dict())
    # after: the configuration stored with the weights (here a network arguments.txt does not describe)
    after = seeded_generator(1, ngf=4, n_res_blocks=2, input_skip=True)
    write_experiment(tmp_path, 'after', arguments, generator_checkpoint(after))
    outputs = {}
    for name, generator in (('before', before), ('after', after)):
        outputs[name] = harmonize(tmp_path, name, one_volume, tmp_path / f'out_{name}')
        np.testing.assert_allclose(outputs[name], expected_output(generator, one_volume), atol=1e-6)
        assert outputs[name].max() > 0.1
    assert not np.allclose(outputs['before'], outputs['after'])


def test_generator_files_load_as_weights_only_and_rebuild_their_network(tmp_path):
    generator = seeded_generator(0, ngf=4, n_res_blocks=1, input_skip=True)
    path = tmp_path / 'netG.pth'
    atomic_save(generator_checkpoint(generator), path)
    saved = torch.load(path, weights_only=True)
    assert saved['generator_config'] == generator.config
    loaded = load_generator_checkpoint(str(path), arguments={})  # arguments.txt is not needed
    assert loaded.config == generator.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), generator.state_dict().values()))


def test_an_older_checkpoint_that_arguments_txt_does_not_describe_is_refused_with_a_fix(tmp_path):
    plain = tmp_path / 'plain.pth'
    torch.save(seeded_generator(0, ngf=8, n_res_blocks=1).state_dict(), plain)
    arguments = vars(parse_arguments(['-ex', 'x', *NETWORK]))
    with pytest.raises(UserError, match=r'arguments.txt \(--ngf 8, --n_res_blocks 1, --input_skip True, '
                                       r'--residual False, --intensity_curve False\)'):
        load_generator_checkpoint(str(plain), {**arguments, 'input_skip': True})
    with pytest.raises(UserError, match="arguments.txt lacks 'ngf'.*add the --ngf it was trained with to it"):
        load_generator_checkpoint(str(plain), {'vendor1': 'SIEMENS', 'vendor2': 'Philips'})
    damaged = tmp_path / 'damaged.pth'
    torch.save({'generator_config': {'ngf': 8}, 'state_dict': {}}, damaged)
    with pytest.raises(UserError, match='damaged.pth: its generator configuration'):
        load_generator_checkpoint(str(damaged), arguments)


def test_resume_refuses_a_changed_input_skip_in_new_and_older_training_states(pickle_dataset, tmp_path):
    flags = ['-ex', 'exp', '--data_root', pickle_dataset, '--save_dir', str(tmp_path), *tiny_train_flags()]
    args = parse_arguments(flags)
    experiment_dir = tmp_path / 'exp'
    (experiment_dir / 'model').mkdir(parents=True)
    trainer = CycleGANTrainer(args, torch.device('cpu'), str(experiment_dir))
    state = trainer.state(1)
    assert state['generator_config'] == generator_config(args) == trainer.nets['G_AB'].config
    older = {key: value for key, value in state.items() if key != 'generator_config'}
    older['args'] = {key: value for key, value in state['args'].items() if key != 'input_skip'}
    for kept in (state, older):
        atomic_save(kept, experiment_dir / 'model' / 'last.pth')
        assert train.load_resume_state(parse_arguments([*flags, '--resume']), str(experiment_dir))['epoch'] == 1
        with pytest.raises(UserError, match='--input_skip True differs from False'):
            train.load_resume_state(parse_arguments([*flags, '--resume', '--input_skip']), str(experiment_dir))


def test_the_benchmark_times_the_recipes_networks():
    from benchmarks.benchmark import build_trainer
    recipe = parse_arguments(['@' + os.path.join(REPO, 'recipes', 'cpu.args'), '-ex', 'x'])
    trainer = build_trainer('cpu', torch.device('cpu'), amp=False, channels_last=False)
    assert recipe.input_skip  # the flag the hand-kept copy left out
    for name in ('G_AB', 'G_BA'):
        assert trainer.nets[name].config == generator_config(recipe)
    for name in ('D_A', 'D_B'):
        assert sum(p.numel() for p in trainer.nets[name].parameters()) == \
            sum(p.numel() for p in Discriminator(ndf=recipe.ndf).parameters())
