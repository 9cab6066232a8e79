"""Gate-map pictures: denoising steps x units, coloured by choice, one panel per chunk."""

from typing import Optional
from typing import Sequence

import numpy as np

COLOURS = ('#2b2b2b', '#3b82f6', '#f59e0b', '#10b981')  # compute, forward, timestep, rollout
LABELS = ('compute', 'reuse forward', 'reuse timestep', 'reuse rollout')


def plot_gate_maps(gate_maps: Sequence, path: str, unit_names: Sequence[str],
                   title: Optional[str] = None, chunk_labels: Optional[Sequence[str]] = None):
    """Save a PNG with one (K x U) panel per gate map.

    Args:
        gate_maps: sequence of (K, U) integer maps (tensors or arrays), one per chunk.
        path: output PNG path.
        unit_names: U unit names for the x axis (e.g. ``l0.sa``).
        title: figure title.
        chunk_labels: per-panel titles (default ``chunk i``).
    """
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    maps = [np.asarray(m) for m in gate_maps]
    if not maps:
        raise ValueError('plot_gate_maps needs at least one gate map')
    n = len(maps)
    fig, axes = plt.subplots(1, n, figsize=(2.2 + 2.4 * n, 5.2), squeeze=False)
    cmap = ListedColormap(COLOURS)
    for i, (ax, gm) in enumerate(zip(axes[0], maps)):
        ax.imshow(gm, cmap=cmap, vmin=-0.5, vmax=3.5, aspect='auto', interpolation='nearest')
        sparsity = float((gm != 0).mean())
        label = chunk_labels[i] if chunk_labels else f'chunk {i}'
        ax.set_title(f'{label}\nsparsity {sparsity:.3f}', fontsize=9)
        ax.set_xlabel('unit')
        step = max(1, len(unit_names) // 8)
        ax.set_xticks(range(0, len(unit_names), step))
        ax.set_xticklabels(unit_names[::step], rotation=90, fontsize=7)
        if i == 0:
            ax.set_ylabel('denoising step (0 = noisiest)')
    handles = [Patch(color=c, label=lab) for c, lab in zip(COLOURS, LABELS)]
    fig.legend(handles=handles, loc='lower center', ncol=4, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
