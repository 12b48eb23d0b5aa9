"""ResNet generator of the CycleGAN paper (Zhu et al. 2017), for single-channel MRI slices, and the one way to
build it from a configuration (stored with every checkpoint, see utils/checkpoint.py)."""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

# train.py's flags that shape the generator; its channels are not flags (one MRI contrast in, one out)
GENERATOR_FLAGS = ('ngf', 'n_res_blocks', 'input_skip', 'residual', 'intensity_curve')
GENERATOR_CONFIG_KEYS = ('in_channels', 'out_channels', *GENERATOR_FLAGS)
# what experiments written before a key existed were trained with
CONFIG_DEFAULTS = {'in_channels': 1, 'out_channels': 1, 'input_skip': False, 'residual': False,
                   'intensity_curve': False}
# Foreground percentiles that place the intensity curve's knots (Nyul's deciles, with finer steps of 5): with the
# two ends of the intensity range, CURVE_POINTS knots.
CURVE_PERCENTILES = (1, *range(5, 100, 5), 99)
CURVE_POINTS = len(CURVE_PERCENTILES) + 2


def piecewise_linear(x, knots_in, knots_out):
    """The piecewise-linear curve through (knots_in[i], knots_out[i]) at x (knots_in strictly increasing); beyond
    the first and last knots the end segments continue."""
    segment = torch.bucketize(x.detach().float(), knots_in[1:-1].contiguous())
    x0, x1 = knots_in[segment], knots_in[segment + 1]
    y0, y1 = knots_out[segment], knots_out[segment + 1]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


def curve_knots(foreground_values, eps=1e-4):
    """CURVE_POINTS knots in [-1, 1] from a vendor's foreground intensities (in [-1, 1]): -1 (the background), the
    CURVE_PERCENTILES of the values, 1 (the robust maximum); nudged apart so that they strictly increase."""
    values = torch.as_tensor(foreground_values, dtype=torch.float64).flatten()
    if values.numel() == 0:
        raise ValueError('no foreground intensities to place the curve\'s knots on')
    inner = torch.quantile(values, torch.tensor(CURVE_PERCENTILES, dtype=torch.float64) / 100)
    knots = torch.cat([torch.tensor([-1.0], dtype=torch.float64), inner, torch.tensor([1.0], dtype=torch.float64)])
    knots = knots.clamp(-1, 1)
    # strictly increasing: each knot at least eps above the one before, squeezed back under 1 from the top
    steps = torch.arange(CURVE_POINTS, dtype=torch.float64) * eps
    knots = torch.cummax(knots - steps, dim=0).values + steps
    knots = torch.minimum(knots, 1 - steps.flip(0))
    return knots.float()


class ShiftAddConv2d(nn.Conv2d):
    """nn.Conv2d (stride 1, no padding) for layers with many input and few output channels, such as the
    generator's last 7x7 64->1 convolution, computed on the CPU as a 1x1 convolution to one map per kernel
    tap, then the maps shifted and summed. Same parameters, result and multiply-adds, but one large matrix
    multiply, which the CPU runs several times faster than the library's kernel for this shape
    (docs/performance.md, "Kernels and precision"). Other devices use the library kernel.
    """

    def forward(self, x):
        if x.device.type != 'cpu':
            return super().forward(x)
        out_channels, in_channels, kernel_h, kernel_w = self.weight.shape
        taps = self.weight.permute(2, 3, 0, 1).reshape(kernel_h * kernel_w * out_channels, in_channels, 1, 1)
        maps = F.conv2d(x, taps).split(out_channels, dim=1)  # maps[i * kernel_w + j]: the tap at (i, j)
        height, width = x.shape[-2] - kernel_h + 1, x.shape[-1] - kernel_w + 1
        # summed in float32: under autocast the maps are bfloat16/float16, too coarse to add 49 of them
        out = maps[0][..., :height, :width].float() + self.bias.float().view(1, -1, 1, 1)
        for tap in range(1, kernel_h * kernel_w):
            i, j = divmod(tap, kernel_w)
            out = out + maps[tap][..., i:i + height, j:j + width]
        return out


class Float32Conv2d(nn.Conv2d):
    """nn.Conv2d computed in float32 under autocast (--amp): the generator's two downsamplings.

    In bfloat16 or float16 these two layers stalled GPU training far below float32 while the rest of the
    generator trains in bfloat16 to the float32 figures (docs/performance.md, "Kernels and precision";
    experiments/amp_precision.py reruns the variants). They are about 5% of the generator's multiply-adds.
    """

    def forward(self, x):
        device = x.device.type
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return super().forward(x.float())
        return super().forward(x)


class ResidualBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
        )

    def forward(self, x):
        return x + self.block(x)


class Generator(nn.Module):
    """7x7 conv, two stride-2 downsamplings, residual blocks, two transposed-conv upsamplings, 7x7 conv + tanh.

    Input and output are (N, channels, H, W) in [-1, 1]. The two downsamplings need H and W to be
    multiples of 4: other sizes are padded (edge values repeated) and the output cropped back.

    input_skip=True (off in the seed's network) adds ngf maps computed from each input voxel alone (a 1x1
    convolution and a ReLU: a learned intensity curve) to the last convolution's input. Without them the
    network cannot see intensity levels: the instance normalisation after the first convolution gives a
    slice and any a * x + b (a > 0) of it the same output, so it must guess them from the anatomy.

    residual=True (off in the seed's network) makes the network's output a change added to its input,
    clamped to [-1, 1]: it starts as the identity, so the anatomy is there from the first step and unpaired
    losses only have to learn what differs between the vendors (as IGUANe's generator does).

    intensity_curve=True (off in the seed's network) passes the input through a fixed, monotone piecewise-linear
    intensity curve before the network: knots at the same foreground percentiles of the input vendor's and of
    the output vendor's training slices (Nyul's histogram standardisation, fitted on each vendor's pool), set once
    by the trainer (set_intensity_curve) and stored as buffers with the weights. With residual=True the network
    then starts where histogram standardisation ends and only learns what a curve cannot map (blur, texture,
    local contrast). Until it is set the curve is the identity.

    float32_downsamplings (2: both, as trained) is how many of the two downsamplings, from the first, stay in
    float32 under autocast; fewer only to rerun the precision experiment (experiments/amp_precision.py). It
    changes no weight, so it is not part of the configuration stored with checkpoints.
    """

    def __init__(self, in_channels=1, out_channels=1, ngf=64, n_res_blocks=9, input_skip=False, residual=False,
                 intensity_curve=False, float32_downsamplings=2):
        super().__init__()
        if residual and in_channels != out_channels:
            raise ValueError('a residual generator needs as many output channels as input channels')
        self.config = {'in_channels': in_channels, 'out_channels': out_channels, 'ngf': ngf,
                       'n_res_blocks': n_res_blocks, 'input_skip': input_skip, 'residual': residual,
                       'intensity_curve': intensity_curve}
        self.residual = residual
        self.intensity_curve = intensity_curve
        if intensity_curve:
            self.register_buffer('curve_in', torch.linspace(-1, 1, CURVE_POINTS))
            self.register_buffer('curve_out', torch.linspace(-1, 1, CURVE_POINTS))
        layers = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, ngf, 7),
            nn.InstanceNorm2d(ngf),
            nn.ReLU(inplace=True),
        ]
        channels = ngf
        for index in range(2):
            downsampling = Float32Conv2d if index < float32_downsamplings else nn.Conv2d
            layers += [
                downsampling(channels, channels * 2, 3, stride=2, padding=1),
                nn.InstanceNorm2d(channels * 2),
                nn.ReLU(inplace=True),
            ]
            channels *= 2
        layers += [ResidualBlock(channels) for _ in range(n_res_blocks)]
        for _ in range(2):
            layers += [
                nn.ConvTranspose2d(channels, channels // 2, 3, stride=2, padding=1, output_padding=1),
                nn.InstanceNorm2d(channels // 2),
                nn.ReLU(inplace=True),
            ]
            channels //= 2
        head_channels = channels + (ngf if input_skip else 0)
        last = ShiftAddConv2d(head_channels, out_channels, 7)
        last.zero_init = residual  # a residual generator starts as the identity (utils/trainer.py init_weights)
        head = [nn.ReflectionPad2d(3), last, nn.Tanh()]
        if input_skip:
            self.model = nn.Sequential(*layers)
            self.intensity = nn.Sequential(nn.Conv2d(in_channels, ngf, 1), nn.ReLU(inplace=True))
            self.head = nn.Sequential(*head)
        else:  # the seed's layout: one Sequential, so its checkpoints keep their keys
            self.model = nn.Sequential(*layers, *head)
        self.input_skip = input_skip

    @torch.no_grad()
    def set_intensity_curve(self, input_values, output_values):
        """Fit the intensity curve: knots at the same percentiles of the input vendor's and the output vendor's
        foreground intensities (each in [-1, 1], any shape)."""
        if not self.intensity_curve:
            raise ValueError('this generator was built without intensity_curve')
        self.curve_in.copy_(curve_knots(input_values))
        self.curve_out.copy_(curve_knots(output_values))

    def _run(self, x):
        if self.intensity_curve:
            x = piecewise_linear(x, self.curve_in, self.curve_out).to(x.dtype)
        if self.input_skip:
            out = self.head(torch.cat([self.model(x), self.intensity(x)], dim=1))
        else:
            out = self.model(x)
        return (x + out).clamp(-1, 1) if self.residual else out

    def forward(self, x):
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % 4, -width % 4
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode='replicate')
            return self._run(x)[..., :height, :width]
        return self._run(x)


def generator_config(arguments):
    """The generator's configuration from train.py's flags: an argparse.Namespace, or the dict of an experiment's
    arguments.txt (keys added since it was written take the value the experiment was trained with).
    Raises KeyError naming the key when ngf or n_res_blocks is missing."""
    values = vars(arguments) if isinstance(arguments, argparse.Namespace) else arguments
    return {key: values[key] if key in values else CONFIG_DEFAULTS[key] for key in GENERATOR_CONFIG_KEYS}


def build_generator(config, **options):
    """A Generator of this configuration (generator_config's dict, or one read from a checkpoint: keys added since
    it was written take the value it was trained with); options are Generator's arguments that change no weight
    (float32_downsamplings). Raises KeyError naming a missing key that has no such value (ngf, n_res_blocks)."""
    return Generator(**{key: config[key] if key in config else CONFIG_DEFAULTS[key] for key in GENERATOR_CONFIG_KEYS},
                     **options)
