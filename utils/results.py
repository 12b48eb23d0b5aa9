"""What training writes for people to read: loss/loss.csv, loss/loss.png and sample grids."""
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

LOSS_TERMS = ('Total', 'Adversarial', 'Cycle', 'Identity', 'Matching', 'Distribution', 'Discriminator')
METRIC_COLUMNS = ('Eval SSIM A2B', 'Eval PSNR A2B', 'Eval SSIM B2A', 'Eval PSNR B2A',
                  'Eval VendorDistance A2B', 'Eval Anatomy A2B', 'Eval VendorDistance B2A', 'Eval Anatomy B2A')
LOSS_COLUMNS = (['epoch'] + [f'Train {term}' for term in LOSS_TERMS] + [f'Eval {term}' for term in LOSS_TERMS]
                + list(METRIC_COLUMNS))


def read_loss_table(path):
    """Rows already in loss.csv (an empty table if there is none)."""
    if os.path.exists(path):
        return pd.read_csv(path)
    return pd.DataFrame(columns=LOSS_COLUMNS)


def write_loss_table(table, path):
    tmp = f'{path}.tmp'
    table.to_csv(tmp, index=False, float_format='%.6g')
    os.replace(tmp, path)


def append_epoch(path, row):
    """Add one epoch's row to loss.csv, replacing a row of the same epoch (after a resume)."""
    table = read_loss_table(path)
    table = table[table['epoch'] != row['epoch']]
    table = pd.concat([table, pd.DataFrame([row], columns=LOSS_COLUMNS)], ignore_index=True)
    table = table.sort_values('epoch').reset_index(drop=True)
    write_loss_table(table, path)
    return table


def plot_losses(table, path):
    """One panel per loss term (train vs eval), then eval SSIM and PSNR against the epoch, or, for an eval set
    without pairs, the reference-free vendor distance and anatomy figures."""
    fig, axes = plt.subplots(2, 5, figsize=(20, 7))
    with_pairs = table[['Eval SSIM A2B', 'Eval SSIM B2A']].notna().to_numpy().any() or \
        not table[['Eval VendorDistance A2B', 'Eval VendorDistance B2A']].notna().to_numpy().any()
    metrics = (('SSIM', 'SSIM'), ('PSNR', 'PSNR (dB)')) if with_pairs else \
        (('VendorDistance', 'vendor distance (lower is better)'), ('Anatomy', 'anatomy kept (NMI, higher is better)'))
    for ax, term in zip(axes.flat, LOSS_TERMS):
        ax.plot(table['epoch'], table[f'Train {term}'], 'o-', label='train')
        ax.plot(table['epoch'], table[f'Eval {term}'], 's--', label='eval')
        ax.set_title(term)
        ax.set_xlabel('epoch')
        ax.legend()
    axes.flat[-1].axis('off')
    for ax, (metric, title) in zip(axes.flat[len(LOSS_TERMS):], metrics):
        ax.plot(table['epoch'], table[f'Eval {metric} A2B'], 'o-', label='A to B')
        ax.plot(table['epoch'], table[f'Eval {metric} B2A'], 's--', label='B to A')
        ax.set_title(f'Eval {title}')
        ax.set_xlabel('epoch')
        ax.legend()
    fig.tight_layout()
    tmp = f'{path}.tmp.png'
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


def save_sample_grid(columns, titles, path, max_rows=4):
    """Save image columns (tensors (N, 1, H, W) in [-1, 1]) side by side, one title per column, at most max_rows rows."""
    rows = min(max_rows, columns[0].shape[0])
    images = torch.stack([column[:rows].detach().float().cpu() for column in columns], dim=1)
    images = images.reshape(-1, *images.shape[2:])
    grid = make_grid(images, nrow=len(columns), padding=2, normalize=True, value_range=(-1, 1))
    height, width = columns[0].shape[-2:]
    inches = max(width, height, 96) / 48  # at least 2 inches a column, so vendor names fit
    fig = plt.figure(figsize=(len(columns) * inches, rows * inches * height / max(width, height) + 0.6))
    ax = fig.add_axes([0, 0, 1, 1 - 0.6 / fig.get_figheight()])
    ax.imshow(grid[0].numpy(), cmap='gray', vmin=0, vmax=1)
    ax.set_xticks([(i + 0.5) * (width + 2) for i in range(len(columns))])
    ax.set_xticklabels(titles, fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks([])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)
