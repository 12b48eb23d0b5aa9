"""The generator and discriminator: shapes for any slice size, output range, parameter counts."""
import numpy as np
import pytest
import torch

from model.discriminator import Discriminator
from model.generator import Generator


def count(module):
    return sum(p.numel() for p in module.parameters())


def conv_params(c_in, c_out, k):
    """A k x k (transposed) convolution with a bias: c_in * c_out * k^2 + c_out."""
    return c_in * c_out * k * k + c_out


def generator_params(c_in=1, c_out=1, ngf=64, blocks=9):
    """Hand count of the ResNet generator (instance norms have no affine parameters):

      c7s1-ngf            c_in*ngf*49 + ngf
      down 1 (3x3)        ngf*2ngf*9 + 2ngf
      down 2 (3x3)        2ngf*4ngf*9 + 4ngf
      blocks x (2 3x3)    blocks * 2 * (4ngf*4ngf*9 + 4ngf)
      up 1 (3x3, transp)  4ngf*2ngf*9 + 2ngf
      up 2 (3x3, transp)  2ngf*ngf*9 + ngf
      c7s1-out            ngf*c_out*49 + c_out

    Defaults (1 channel, ngf 64, 9 blocks): 3,200 + 73,856 + 295,168 + 9 * 1,180,160 + 295,040 + 73,792 + 3,137
    = 11,365,633 parameters.
    """
    f = ngf
    return (conv_params(c_in, f, 7) + conv_params(f, 2 * f, 3) + conv_params(2 * f, 4 * f, 3)
            + blocks * 2 * conv_params(4 * f, 4 * f, 3)
            + conv_params(4 * f, 2 * f, 3) + conv_params(2 * f, f, 3) + conv_params(f, c_out, 7))


def discriminator_params(c_in=1, ndf=64):
    """Four 4x4 convs (c_in->ndf->2ndf->4ndf->8ndf) and a 4x4 conv to one channel, all with biases.
    Defaults: 1,088 + 131,200 + 524,544 + 2,097,664 + 8,193 = 2,762,689."""
    d = ndf
    return (conv_params(c_in, d, 4) + conv_params(d, 2 * d, 4) + conv_params(2 * d, 4 * d, 4)
            + conv_params(4 * d, 8 * d, 4) + conv_params(8 * d, 1, 4))


def test_hand_formulas_give_the_documented_totals():
    assert generator_params() == 11_365_633
    assert discriminator_params() == 2_762_689


def test_default_generator_has_about_11_37_million_parameters():
    n = count(Generator())
    assert n == generator_params()
    assert abs(n - 11.37e6) < 0.01e6


def test_default_discriminator_has_2_762_689_parameters():
    assert count(Discriminator()) == 2_762_689


@pytest.mark.parametrize('ngf, blocks', [(8, 2), (32, 6), (16, 0), (64, 3)])
def test_generator_width_and_depth_flags_change_the_count_as_the_formula(ngf, blocks):
    assert count(Generator(ngf=ngf, n_res_blocks=blocks)) == generator_params(ngf=ngf, blocks=blocks)


def test_each_residual_block_adds_two_3x3_convs_of_4ngf_channels():
    for ngf in (8, 16):
        per_block = 2 * (9 * (4 * ngf) ** 2 + 4 * ngf)
        assert count(Generator(ngf=ngf, n_res_blocks=5)) - count(Generator(ngf=ngf, n_res_blocks=4)) == per_block
    # width: ngf=32 is about a quarter of ngf=64 (convs dominate, they scale with ngf^2)
    ratio = count(Generator(ngf=32)) / count(Generator(ngf=64))
    assert 0.24 < ratio < 0.26


@pytest.mark.parametrize('ndf', [8, 16, 32])
def test_discriminator_width_flag_changes_the_count_as_the_formula(ndf):
    assert count(Discriminator(ndf=ndf)) == discriminator_params(ndf=ndf)


def test_multichannel_counts():
    assert count(Generator(in_channels=3, out_channels=2, ngf=8, n_res_blocks=1)) == generator_params(3, 2, 8, 1)
    assert count(Discriminator(in_channels=3, ndf=8)) == discriminator_params(3, 8)


@pytest.mark.parametrize('size', [(48, 56), (64, 64), (50, 59), (37, 41), (49, 58), (8, 8), (33, 32), (32, 35)])
def test_generator_output_shape_equals_input_shape_and_is_in_range(size):
    torch.manual_seed(0)
    net = Generator(ngf=8, n_res_blocks=2)
    x = torch.randn(2, 1, *size) * 5  # far outside [-1, 1]: the tanh must still bound the output
    with torch.no_grad():
        y = net(x)
    assert y.shape == x.shape
    assert y.dtype == x.dtype
    assert torch.isfinite(y).all()
    assert y.min() >= -1 and y.max() <= 1
    assert y.std() > 0  # not a constant image


def test_default_generator_on_an_odd_slice():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 37, 41) * 2 - 1
    with torch.no_grad():
        y = Generator()(x)
    assert y.shape == (1, 1, 37, 41)
    assert y.abs().max() <= 1


def test_generator_multichannel_shape():
    x = torch.rand(2, 3, 50, 59) * 2 - 1
    with torch.no_grad():
        y = Generator(in_channels=3, out_channels=2, ngf=8, n_res_blocks=1)(x)
    assert y.shape == (2, 2, 50, 59)


@pytest.mark.parametrize('height, width', [(47, 55), (45, 53), (46, 56), (48, 54)])
def test_generator_output_on_an_odd_slice_is_aligned_with_the_input(height, width):
    """An MRI slice cut to an odd size gives the same picture as the full slice, in the same place: the
    padding to a multiple of 4 and the crop back keep the output aligned with the input (no shift)."""
    from conftest import mni_t1
    torch.manual_seed(0)
    volume = np.asarray(mni_t1(4).dataobj, dtype=np.float32)
    full = torch.from_numpy(volume[:48, :56, 24] / volume.max() * 2 - 1)[None, None]  # background at the edges
    net = Generator(ngf=8, n_res_blocks=2).eval()
    with torch.no_grad():
        reference = net(full)[..., :height, :width]
        cut = net(full[..., :height, :width])
    assert cut.shape == (1, 1, height, width)
    inner = (..., slice(0, height - 8), slice(0, width - 8))  # away from the cut edges
    error = (cut - reference)[inner].abs().mean()
    assert error < 0.1 * reference.std(), (error, reference.std())


def test_generator_treats_images_of_a_batch_independently():
    """Instance norm is per image: a batch gives the same outputs as one image at a time (utils.losses
    relies on this when it batches the identity pass with the translation)."""
    torch.manual_seed(0)
    net = Generator(ngf=8, n_res_blocks=2)
    a, b = torch.rand(2, 1, 1, 37, 41) * 2 - 1
    with torch.no_grad():
        together = net(torch.cat([a, b]))
        separate = torch.cat([net(a), net(b)])
    torch.testing.assert_close(together, separate, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('size', [(50, 59), (37, 41), (64, 64), (24, 24), (128, 96)])
@pytest.mark.parametrize('batch', [1, 3])
def test_discriminator_gives_one_logit_per_image(size, batch):
    torch.manual_seed(0)
    net = Discriminator(ndf=8)
    x = torch.rand(batch, 1, *size) * 2 - 1
    out = net(x)
    assert out.shape == (batch, 1)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_default_discriminator_shape():
    with torch.no_grad():
        assert Discriminator()(torch.zeros(2, 1, 50, 59)).shape == (2, 1)


@pytest.mark.parametrize('n_layers, field_of_view', [(1, 16), (2, 34), (3, 70)])
def test_discriminator_layers_set_each_logits_field_of_view(n_layers, field_of_view):
    """One patch logit depends on exactly field_of_view x field_of_view input pixels (the reference PatchGAN's
    receptive field for n_layers_D), and the smallest input still gives a logit."""
    torch.manual_seed(0)
    net = Discriminator(ndf=4, n_layers=n_layers)
    convolutions = torch.nn.Sequential(*[layer for layer in net.model if not isinstance(layer, torch.nn.InstanceNorm2d)])
    x = (torch.rand(1, 1, 96, 96) * 2 - 1).requires_grad_()
    patches = convolutions(x)  # instance normalisation spreads image-wide statistics; the convolutions set the view
    patches[0, 0, patches.shape[2] // 2, patches.shape[3] // 2].backward()
    rows, cols = torch.nonzero(x.grad[0, 0], as_tuple=True)
    assert int(rows.max() - rows.min()) + 1 == int(cols.max() - cols.min()) + 1 == field_of_view
    with torch.no_grad():
        assert net(torch.zeros(2, 1, 5, 7)).shape == (2, 1)
    if n_layers == 3:  # the seed's network, parameter for parameter
        assert list(net.state_dict()) == list(Discriminator(ndf=4).state_dict())


@pytest.mark.parametrize('in_channels, out_channels, kernel, shape', [(16, 1, 7, (2, 16, 30, 41)),
                                                                      (6, 3, 3, (1, 6, 9, 12))])
def test_shift_add_conv_equals_the_library_convolution(in_channels, out_channels, kernel, shape):
    """The generator's last layer (taps as a 1x1 convolution, shifted and summed) matches nn.Conv2d in value
    and in all three gradients, and keeps nn.Conv2d's parameters, so checkpoints load either way."""
    from model.generator import ShiftAddConv2d
    torch.manual_seed(0)
    fast = ShiftAddConv2d(in_channels, out_channels, kernel)
    library = torch.nn.Conv2d(in_channels, out_channels, kernel)
    library.load_state_dict(fast.state_dict())
    x = torch.randn(*shape, requires_grad=True)
    got, want = fast(x), library(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(want)
    grads_got = torch.autograd.grad(got, [x, fast.weight, fast.bias], upstream)
    grads_want = torch.autograd.grad(want, [x, library.weight, library.bias], upstream)
    for name, g, w in zip(('input', 'weight', 'bias'), grads_got, grads_want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=name)
    with torch.autocast('cpu', torch.bfloat16):  # bfloat16 taps, summed in float32: within bfloat16's 3 digits
        got = fast(x)
    assert got.dtype == torch.float32
    assert (got - want).abs().max() <= 0.01 * want.abs().max()


def test_generator_state_dict_keys_are_those_of_plain_layers():
    """Checkpoints written before the faster last layer (plain nn.Conv2d) load into today's generator."""
    generator = Generator(ngf=8, n_res_blocks=1)
    assert isinstance(generator.model[-2], torch.nn.Conv2d)
    keys = list(generator.state_dict())
    assert keys[-2:] == [f'model.{len(generator.model) - 2}.weight', f'model.{len(generator.model) - 2}.bias']
    assert all('taps' not in key for key in keys)


def test_downsamplings_stay_float32_under_autocast():
    """Under --amp the generator's two stride-2 convolutions run in float32 (in bfloat16 they stalled CUDA
    training at 16 dB): exactly the float32 result, float32 gradients; every other convolution is autocast."""
    from model.generator import Float32Conv2d
    torch.manual_seed(0)
    generator = Generator(ngf=8, n_res_blocks=1)
    x = torch.rand(2, 1, 28, 36) * 2 - 1
    dtypes = {}
    for name, layer in generator.named_modules():
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            layer.register_forward_hook(lambda m, i, o, name=name: dtypes.__setitem__(name, (i[0].dtype, o.dtype)))
    with torch.autocast('cpu', torch.bfloat16):
        generator(x).float().mean().backward()
    downsamplings = [name for name, layer in generator.named_modules() if isinstance(layer, Float32Conv2d)]
    assert len(downsamplings) == 2
    for name, (input_dtype, output_dtype) in dtypes.items():
        if name in downsamplings:
            assert output_dtype == torch.float32, name
        elif name != f'model.{len(generator.model) - 2}':  # the last layer sums its taps in float32
            assert output_dtype == torch.bfloat16, name
    first = generator.model[4]
    assert first in [dict(generator.named_modules())[n] for n in downsamplings]
    assert first.weight.grad.dtype == torch.float32
    features = torch.randn(2, 8, 14, 18)
    plain = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
    plain.load_state_dict(first.state_dict())
    with torch.autocast('cpu', torch.bfloat16):
        got = first(features.bfloat16())
    assert torch.equal(got, plain(features.bfloat16().float()))
    with torch.device('meta'):  # the benchmark counts FLOPs on the meta device
        assert Generator(ngf=8, n_res_blocks=1)(torch.empty(1, 1, 28, 36)).shape == (1, 1, 28, 36)


def test_seed_generator_cannot_see_a_slice_intensity_level_and_input_skip_can():
    """Instance normalisation after the first convolution removes any a*x + b (a > 0) change of the whole
    slice, so the seed's generator gives a slice and a darker, shifted copy of it the same output;
    --input_skip's intensity maps make the output depend on the level."""
    torch.manual_seed(0)
    from nilearn.datasets import load_mni152_template
    data = np.asarray(load_mni152_template(resolution=4).dataobj, dtype=np.float32)
    slice_ = torch.from_numpy(data[:, :, 20] / data.max())[None, None] * 2 - 1
    darker = 0.6 * slice_ - 0.2
    change = {}
    for input_skip in (False, True):
        generator = Generator(ngf=8, n_res_blocks=1, input_skip=input_skip).eval()
        with torch.no_grad():
            change[input_skip] = (generator(slice_) - generator(darker)).abs().max().item()
    assert change[False] < 1e-3  # only the normalisation's epsilon (1e-5 in the variance) tells them apart
    assert change[True] > 0.05


def test_input_skip_adds_the_intensity_maps_and_keeps_the_seed_layout_without_it():
    ngf = 8
    plain, skip = Generator(ngf=ngf, n_res_blocks=1), Generator(ngf=ngf, n_res_blocks=1, input_skip=True)
    # a 1x1 convolution 1 -> ngf, and ngf more input channels to the last 7x7 convolution
    assert count(skip) - count(plain) == conv_params(1, ngf, 1) + ngf * 49
    assert not any(key.startswith(('intensity', 'head')) for key in plain.state_dict())
    assert {key.split('.')[0] for key in skip.state_dict()} == {'model', 'intensity', 'head'}


def test_generator_config_from_flags_and_from_an_older_arguments_txt():
    """The configuration comes from train.py's flags or an arguments.txt dict; one written before --input_skip
    existed gives the seed's network; the configuration rebuilds a generator of the same shape."""
    from model.generator import build_generator, generator_config
    from utils.arguments import parse_arguments
    args = parse_arguments(['-ex', 'x', '--ngf', '8', '--n_res_blocks', '1', '--input_skip'])
    config = generator_config(args)
    assert config == {'in_channels': 1, 'out_channels': 1, 'ngf': 8, 'n_res_blocks': 1, 'input_skip': True,
                      'residual': False, 'intensity_curve': False}
    assert generator_config(vars(args)) == config
    older = {key: value for key, value in vars(args).items()
             if key not in ('input_skip', 'residual', 'intensity_curve')}
    assert generator_config(older)['input_skip'] is False and generator_config(older)['residual'] is False
    assert generator_config(older)['intensity_curve'] is False
    with pytest.raises(KeyError, match='n_res_blocks'):
        generator_config({'ngf': 8})
    generator = build_generator(config)
    assert generator.config == config
    assert count(generator) == count(Generator(ngf=8, n_res_blocks=1, input_skip=True))
    build_generator(generator.config).load_state_dict(generator.state_dict())  # strict: every key and shape


@pytest.mark.parametrize('float32_downsamplings, dtypes', [(2, ['float32', 'float32']), (1, ['float32', 'bfloat16']),
                                                           (0, ['bfloat16', 'bfloat16'])])
def test_float32_downsamplings_puts_only_the_downsamplings_back_in_autocast(float32_downsamplings, dtypes):
    """experiments/amp_precision.py's variants: both downsamplings, the first only, or none stay in float32 under
    autocast; the weights keep their names, so any variant loads any checkpoint."""
    generator = Generator(ngf=8, n_res_blocks=1, float32_downsamplings=float32_downsamplings)
    downsamplings = [layer for layer in generator.model
                     if isinstance(layer, torch.nn.Conv2d) and layer.stride == (2, 2)]
    assert len(downsamplings) == 2
    seen = []
    for layer in downsamplings:
        layer.register_forward_hook(lambda m, i, o: seen.append(str(o.dtype).replace('torch.', '')))
    with torch.autocast('cpu', torch.bfloat16):
        generator(torch.zeros(1, 1, 16, 16))
    assert seen == dtypes
    assert generator.config == Generator(ngf=8, n_res_blocks=1).config
    Generator(ngf=8, n_res_blocks=1).load_state_dict(generator.state_dict())


def test_a_residual_generator_starts_as_the_identity_and_learns_a_change():
    from utils.trainer import init_weights
    torch.manual_seed(0)
    net = Generator(ngf=8, n_res_blocks=1, input_skip=True, residual=True)
    net.apply(init_weights)
    x = torch.rand(2, 1, 33, 40) * 2 - 1
    torch.testing.assert_close(net(x), x)  # the anatomy is there before the first step
    target = (x + 0.2).clamp(-1, 1)  # a brighter copy
    start = (x - target).abs().mean().item()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(40):
        optimizer.zero_grad()
        loss = (net(x) - target).abs().mean()
        loss.backward()
        optimizer.step()
    assert loss.item() < start / 2 and net(x).min() >= -1 and net(x).max() <= 1
    assert net.config['residual'] is True


def test_the_intensity_curve_is_numpy_interp_through_its_knots_and_carries_gradients():
    from model.generator import piecewise_linear
    knots_in = torch.tensor([-1.0, -0.5, 0.2, 1.0])
    knots_out = torch.tensor([-1.0, 0.1, 0.3, 1.0])
    x = torch.linspace(-1, 1, 101, requires_grad=True)
    y = piecewise_linear(x, knots_in, knots_out)
    np.testing.assert_allclose(y.detach().numpy(), np.interp(x.detach().numpy(), knots_in.numpy(), knots_out.numpy()),
                               atol=1e-6)
    y.sum().backward()
    slopes = np.diff(knots_out.numpy()) / np.diff(knots_in.numpy())
    assert set(np.round(x.grad.numpy(), 4)) <= set(np.round(slopes, 4))


def test_curve_knots_are_the_foreground_percentiles_between_the_range_ends():
    from model.generator import CURVE_PERCENTILES, CURVE_POINTS, curve_knots
    values = torch.rand(10_000) * 1.2 - 0.7  # foreground in [-0.7, 0.5]
    knots = curve_knots(values)
    assert knots.shape == (CURVE_POINTS,) and knots[0] == -1 and knots[-1] == 1
    np.testing.assert_allclose(knots[1:-1].numpy(), np.percentile(values.numpy(), CURVE_PERCENTILES), atol=1e-4)
    saturated = curve_knots(torch.ones(100))  # every knot at 1: pushed apart so that the curve stays defined
    assert (saturated.diff() > 0).all() and saturated[-1] <= 1


def test_an_intensity_curve_generator_starts_as_histogram_standardisation_and_stores_its_curve(tmp_path):
    """With --intensity_curve and --residual the untrained generator maps each input intensity through the curve
    fitted on the two vendors' values: an input drawn like vendor A comes out distributed like vendor B. The curve
    travels with the weights (a checkpoint rebuilds it), so inference needs nothing else."""
    from utils.checkpoint import generator_checkpoint, load_generator_checkpoint
    from utils.trainer import init_weights
    torch.manual_seed(0)
    net = Generator(ngf=8, n_res_blocks=1, input_skip=True, residual=True, intensity_curve=True)
    net.apply(init_weights)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    torch.testing.assert_close(net(x), x)  # the identity until the curve is set
    vendor_A = torch.rand(20_000) ** 2 * 2 - 1  # dark-skewed
    vendor_B = torch.rand(20_000) ** 0.5 * 2 - 1  # bright-skewed
    net.set_intensity_curve(vendor_A, vendor_B)
    drawn_like_A = (torch.rand(1, 1, 100, 100) ** 2 * 2 - 1)
    out = net(drawn_like_A).detach().flatten()
    quantiles = torch.tensor([0.1, 0.5, 0.9])
    np.testing.assert_allclose(torch.quantile(out, quantiles).numpy(), torch.quantile(vendor_B, quantiles).numpy(),
                               atol=0.03)
    assert torch.quantile(drawn_like_A.flatten(), 0.5) < torch.quantile(out, 0.5) - 0.5
    path = tmp_path / 'G.pth'
    torch.save(generator_checkpoint(net), path)
    loaded = load_generator_checkpoint(str(path), arguments={})
    assert loaded.config['intensity_curve'] is True
    torch.testing.assert_close(loaded(drawn_like_A), net(drawn_like_A))
    with pytest.raises(ValueError, match='without intensity_curve'):
        Generator(ngf=8, n_res_blocks=1).set_intensity_curve(vendor_A, vendor_B)
