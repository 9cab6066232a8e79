"""Draw the direction ablation of both tasks side by side (docs/ablation.md, Table 7).

    python docs/plot_ablation.py docs/ablation.png docs/ablation_lift.json docs/ablation_can.json

Each report is a pooled one (``pool_ablation.py``); a point is matched across reports by its
variant name without the schedule suffix (``omni@ddpm-100`` is ``omni``). Bars: success rate
per variant and task, with the counts written above them.
"""

import json
import sys

ORDER = ('dense', 'sparse', 'omni', 'only-forward', 'only-timestep', 'only-rollout', 'static',
         'random')
LABELS = {'dense': 'dense', 'sparse': 'learned\n(argmax)', 'omni': 'omni\nF+T+R',
          'only-forward': 'forward\nonly', 'only-timestep': 'timestep\nonly',
          'only-rollout': 'rollout\nonly', 'static': 'static\n(FORA)', 'random': 'random'}


def points_by_variant(report: dict) -> dict:
    """``{variant without schedule suffix: point}`` of a pooled report."""
    return {p['name'].partition('@')[0]: p for p in report['points']}


def main(argv) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
    reports = []
    for path in argv[2:]:
        with open(path) as f:
            reports.append(json.load(f))
    width = 0.8 / len(reports)
    fig, ax = plt.subplots(figsize=(11, 4))
    for i, report in enumerate(reports):
        points = points_by_variant(report)
        xs = [j + (i - (len(reports) - 1) / 2) * width for j in range(len(ORDER))]
        rates = [points[v]['success'] if v in points else 0.0 for v in ORDER]
        bars = ax.bar(xs, rates, width, label=f'{report["task"]} (seeds {report["seeds"][0]}-'
                                                f'{report["seeds"][1]})')
        for bar, v in zip(bars, ORDER):
            if v in points:
                ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01,
                        f'{points[v]["wins"]}/{points[v]["episodes"]}', ha='center',
                        va='bottom', fontsize=7)
    ax.set_xticks(range(len(ORDER)))
    ax.set_xticklabels([LABELS[v] for v in ORDER], fontsize=8)
    ax.set_ylabel('success rate')
    ax.set_ylim(0, 1.12)
    ax.set_title('reuse directions at matched sparsity 0.93 (DDPM-100; dense computes all)')
    ax.legend(fontsize=8)
    ax.grid(axis='y', alpha=0.3)
    fig.tight_layout()
    fig.savefig(argv[1], dpi=100)
    plt.close(fig)
    print(f'plot -> {argv[1]}')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
