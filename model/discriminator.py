"""Convolutional PatchGAN discriminator: stride-2 conv blocks, two stride-1 convs, global average pool to one logit."""
import torch.nn as nn
import torch.nn.functional as F


def min_size(n_layers):
    """The smallest input side that leaves every layer a spatial extent (n_layers stride-2 and two 4x4 convolutions)."""
    return 3 * 2 ** n_layers


class Discriminator(nn.Module):
    """Maps (N, channels, H, W) images to (N, 1) real/fake logits (use with BCEWithLogitsLoss).

    n_layers stride-2 convolutions (the reference CycleGAN's n_layers_D) set each logit's field of view: 70x70
    pixels for the seed's 3, 34 for 2, 16 for 1. A smaller field of view judges texture and contrast rather
    than shapes, so it gives the generators less reason to change anatomy. Images smaller than min_size are
    padded (edge values repeated) so the last layers keep a spatial extent.
    """

    def __init__(self, in_channels=1, ndf=64, n_layers=3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        channels = ndf
        for n in range(1, n_layers + 1):
            out_channels = ndf * min(2 ** n, 8)
            layers += [nn.Conv2d(channels, out_channels, 4, stride=2 if n < n_layers else 1, padding=1),
                       nn.InstanceNorm2d(out_channels), nn.LeakyReLU(0.2, inplace=True)]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, 4, padding=1))
        self.model = nn.Sequential(*layers)
        self.min_size = min_size(n_layers)

    def forward(self, x):
        height, width = x.shape[-2:]
        if height < self.min_size or width < self.min_size:
            x = F.pad(x, (0, max(0, self.min_size - width), 0, max(0, self.min_size - height)), mode='replicate')
        return self.model(x).mean(dim=(2, 3))
