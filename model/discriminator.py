"""Convolutional discriminator: four conv blocks, a last conv, global average pool to one logit per image."""
import torch.nn as nn
import torch.nn.functional as F

MIN_SIZE = 24  # three stride-2 and two 4x4 convolutions leave at least 1x1 before the last norm


class Discriminator(nn.Module):
    """Maps (N, channels, H, W) images to (N, 1) real/fake logits (use with BCEWithLogitsLoss).

    Images smaller than 24x24 are padded (edge values repeated) so the last layers keep a spatial extent.
    """

    def __init__(self, in_channels=1, ndf=64):
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, stride=2, padding=1),
            nn.InstanceNorm2d(ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, ndf * 4, 4, stride=2, padding=1),
            nn.InstanceNorm2d(ndf * 4),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 4, ndf * 8, 4, padding=1),
            nn.InstanceNorm2d(ndf * 8),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 8, 1, 4, padding=1),
        )

    def forward(self, x):
        height, width = x.shape[-2:]
        if height < MIN_SIZE or width < MIN_SIZE:
            x = F.pad(x, (0, max(0, MIN_SIZE - width), 0, max(0, MIN_SIZE - height)), mode='replicate')
        return self.model(x).mean(dim=(2, 3))
