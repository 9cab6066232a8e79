"""Sparse evaluation variants for ``sparse-policy eval`` (learned gates, dial, ablations).

Every variant runs through :class:`SparseEngine` at batch 1, so units are truly skipped and
the measured chunk latency is the deployed one. Variant names:

================  ===========================================================================
``default``       the model's serving default (``serving.json``, written by
                  ``sparse-policy frontier --install``); without one, learned gates on the
                  pruner's schedule, or dense
``sparse``        learned gates as trained (argmax of the pruner, ``target_sparsity = -1``)
``dial-P``        the pruner's compute preference, exactly ``P`` of (step, unit) reused:
                  ``P >= 1`` is a percentage (``dial-90``), ``P < 1`` a fraction (``dial-0.9``)
``omni``          the dial at the ablation sparsity, all three reuse directions
``only-forward``  the dial at the ablation sparsity, reuse only across blocks (F)
``only-timestep`` ... only from the previous denoising step (T)
``only-rollout``  ... only from the previous control step (R)
``static[-P]``    FORA-style baseline: every unit on evenly spaced steps, else reuse T
``random[-P]``    random gates and directions at the same sparsity
``ddim-K``        dense DDIM with K steps (the fewer-steps baseline; no engine sparsity)
================  ===========================================================================

Any variant but ``default`` and ``ddim-K`` takes a schedule suffix ``@<sampler>-<K>``:
``dial-60@ddim-10`` runs the dial on DDIM-10 with the pruner trained for DDIM-10, and
``dense@ddim-10`` equals ``ddim-10``. A learned-gate variant on a schedule that has no pruner
is refused (gates learned for one schedule mean nothing on another).

``P`` defaults to ``--ablation-sparsity`` (0.93, the shipped pruner's target). The
single-direction ablations restrict the *omni-trained* pruner's preferences to one
direction at matched sparsity; the paper trains one binary pruner per direction instead
(tts_method.md §6.4), which is costlier and favours each ablation somewhat more.

Without a suffix, sampler and K of the pruner variants default to ``--sampler`` / ``--steps``,
else to the schedule of the model's first pruner (its metadata).
"""

import re
from typing import Dict
from typing import List
from typing import Optional
from typing import Tuple

import numpy as np
from sparse_policy_node.core.config import REUSE_DIRECTIONS
from sparse_policy_node.core.config import RuntimeConfig
import torch

ONLY = {f'only-{d}': d for d in REUSE_DIRECTIONS}
_NUMBER = r'\d+(?:\.\d+)?'
_SCHEDULE = r'(?:@(?:ddpm|ddim)-\d+)?'
_PATTERN = re.compile(rf'^(default|ddim-\d+|(?:dense|sparse|omni|only-forward|only-timestep|'
                      rf'only-rollout|dial-{_NUMBER}|static(?:-{_NUMBER})?|'
                      rf'random(?:-{_NUMBER})?){_SCHEDULE})$')
USES_PRUNER = ('sparse', 'dial', 'omni', 'only', 'default')


def check_variant(name: str) -> str:
    """Validate a variant name (argparse ``type``); raise ``ValueError`` naming the forms."""
    if not _PATTERN.match(name):
        raise ValueError(f'unknown variant {name!r}; use default, dense, sparse, dial-P, omni, '
                         f'only-forward, only-timestep, only-rollout, static[-P], random[-P] '
                         f'or ddim-K, optionally with a schedule suffix @ddpm-K / @ddim-K')
    base = name.partition('@')[0]
    kind, _, value = base.partition('-')
    if kind in ('dial', 'static', 'random') and value and not 0 <= _sparsity(value) <= 0.99:
        raise ValueError(f'variant {name!r}: sparsity {value} is outside [0, 0.99] (P >= 1 '
                         f'is a percentage, P < 1 a fraction)')
    steps = [int(value)] if kind == 'ddim' else []
    if '@' in name:
        steps.append(int(name.rpartition('-')[2]))
    if any(k < 1 for k in steps):
        raise ValueError(f'variant {name!r}: K must be >= 1')
    return name


def _sparsity(value: str) -> float:
    # 'P' of dial-P / static-P / random-P: a percentage when >= 1, else a fraction.
    number = float(value)
    return number / 100.0 if number >= 1 else number


def variant_schedule(name: str) -> Optional[Tuple[str, int]]:
    """Return the ``@<sampler>-<K>`` suffix of a variant (``ddim-K``: DDIM-K), else None."""
    check_variant(name)
    base, _, suffix = name.partition('@')
    if suffix:
        sampler, _, steps = suffix.partition('-')
        return sampler, int(steps)
    if base.startswith('ddim-'):
        return 'ddim', int(base.split('-')[1])
    return None


def parse_variant(name: str, ablation_sparsity: float) -> Tuple[str, Optional[float]]:
    """Split a variant name (without its schedule suffix) into (kind, parameter).

    The parameter is a sparsity in [0, 0.99], or K for ``ddim``; None for ``dense``,
    ``sparse`` and ``default``.
    """
    check_variant(name)
    name = name.partition('@')[0]
    if name in ('dense', 'sparse', 'default'):
        return name, None
    if name == 'omni' or name in ONLY:
        return ('omni' if name == 'omni' else 'only'), ablation_sparsity
    kind, _, value = name.partition('-')
    if kind == 'ddim':
        return kind, int(value)
    return kind, (_sparsity(value) if value else ablation_sparsity)


class SparseVariant:
    """Policy-like wrapper of :class:`SparseEngine` that keeps per-chunk statistics."""

    def __init__(self, policy, pruner, runtime: Optional[RuntimeConfig]):
        from sparse_policy_node.core.engine import SparseEngine
        self.engine = SparseEngine(policy, pruner, runtime)
        self.chunks: List[dict] = []

    def reset(self) -> None:
        """Start a new episode: clear the engine's caches (next chunk dense) and the statistics."""
        self.engine.reset()
        self.chunks = []

    def predict_action(self, obs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """One chunk; noise comes from torch's global generator (seeded per episode)."""
        out = self.engine.predict_action(obs)
        self.chunks.append(out['stats'])
        return out

    def episode_stats(self) -> dict:
        """Per-episode means: sparsity of the gated chunks and of all chunks, MACs, times."""
        return chunk_summary(self.chunks)

    def close(self) -> None:
        """Stop the engine's worker thread."""
        self.engine.close()


def chunk_summary(chunks: List[dict]) -> dict:
    """Summarize the engine statistics of one episode's chunks.

    ``realized_sparsity`` averages the chunks the gates control (the first chunk of an episode
    is dense by rule); ``episode_sparsity`` averages every chunk, the first one included.
    """
    if not chunks:
        return {}
    gated = [c for c in chunks if not c['dense']] or chunks
    return {
        'realized_sparsity': round(float(np.mean([c['realized_sparsity'] for c in gated])), 4),
        'episode_sparsity': round(float(np.mean([c['realized_sparsity'] for c in chunks])), 4),
        'gmacs': round(float(np.mean([c['gmacs'] for c in chunks])), 4),
        'pruner_ms': round(float(np.mean([c['pruner_ms'] for c in gated])), 3),
        'reuse_counts': {k: int(sum(c[k] for c in gated))
                         for k in ('compute', 'forward', 'timestep', 'rollout')},
    }


def policy_device(policy) -> torch.device:
    """Return the device of a policy's weights (pruners are loaded next to it)."""
    return next(policy.parameters()).device


def pruner_schedule(model_dir: str) -> Optional[Tuple[str, int]]:
    """(sampler, K) of the model's top-level pruner, None without a pruner or metadata."""
    from sparse_policy_node.core.checkpoint import has_pruner
    from sparse_policy_node.core.checkpoint import pruner_schedule_of
    from sparse_policy_node.core.checkpoint import read_pruner_metadata
    if not has_pruner(model_dir):
        return None
    return pruner_schedule_of(read_pruner_metadata(model_dir))


def make_sparse_variant(name: str, policy, options: dict):
    """Build the policy-like object of a non-dense variant (see the module table).

    Args:
        name: variant name.
        policy: the loaded :class:`DiffusionPolicy`.
        options: ``model`` (directory), optional ``sampler``, ``steps``,
            ``ablation_sparsity`` and ``precision`` (the engine variants' denoiser; a dense
            variant below float32 runs on the engine with sparsity off).
    """
    from sparse_policy_node.core.checkpoint import load_pruners
    from sparse_policy_node.core.engine import serving_runtime
    from sparse_policy_node.training.evaluate import DensePolicy
    kind, param = parse_variant(name, options.get('ablation_sparsity') or 0.93)
    suffix = variant_schedule(name)
    precision = options.get('precision') or 'float32'
    if kind == 'ddim' or kind == 'dense':
        sampler, steps = suffix or (options.get('sampler'), options.get('steps'))
        if precision == 'float32':
            return DensePolicy(policy, sampler, steps)
        sched = policy.config.scheduler
        return SparseVariant(policy, {}, RuntimeConfig(
            sparsity_enabled=False, sampler=sampler or sched.sampler,
            num_inference_steps=steps or sched.num_inference_steps, precision=precision))
    pruners = load_pruners(options['model'], policy_device(policy)) \
        if kind in USES_PRUNER else {}
    if kind == 'default':
        return SparseVariant(policy, pruners, serving_runtime(options['model']).replace(
            precision=precision))
    sched = policy.config.scheduler
    trained = pruner_schedule(options['model']) if kind in USES_PRUNER else None
    if suffix:
        sampler, steps = suffix
    else:
        sampler = options.get('sampler') or (trained[0] if trained else sched.sampler)
        steps = options.get('steps') or (trained[1] if trained else sched.num_inference_steps)
    pruner = pruners
    if kind == 'sparse':
        knobs = {'gate_source': 'pruner', 'target_sparsity': -1.0}
    elif kind in ('dial', 'omni'):
        knobs = {'gate_source': 'pruner', 'target_sparsity': param}
    elif kind == 'only':
        knobs = {'gate_source': 'pruner', 'target_sparsity': param,
                 'directions': (ONLY[name],)}
    else:  # static / random baselines
        knobs = {'gate_source': kind, 'target_sparsity': param}
    max_age = options.get('rollout_max_age')
    if max_age is None:  # deploy as trained: the max age the schedule's pruner learned with
        from sparse_policy_node.core.checkpoint import for_schedule
        from sparse_policy_node.core.checkpoint import trained_max_age
        max_age = trained_max_age(for_schedule(pruners, (sampler, steps)))
    runtime = RuntimeConfig(sampler=sampler, num_inference_steps=steps,
                            rollout_max_age=max_age, precision=precision, **knobs)
    return SparseVariant(policy, pruner, runtime)


def plot_tradeoff(report: dict, variants: List[str], path: str) -> None:
    """Save success rate against realized sparsity and against chunk latency, per variant."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
    K_ref = report.get('num_inference_steps') or 100
    fig, (ax_s, ax_t) = plt.subplots(1, 2, figsize=(10, 4))
    for name in variants:
        success = report[f'success_{name}']
        latency = report[f'chunk_ms_{name}']
        if name.startswith('ddim-'):
            # Fewer steps skip whole steps: plotted at the share of step evaluations skipped.
            x, marker = 1.0 - int(name.split('-')[1]) / K_ref, 's'
        else:
            x, marker = report.get(f'realized_sparsity_{name}', 0.0), 'o'
        for ax, xv in ((ax_s, x), (ax_t, latency)):
            ax.scatter([xv], [success], marker=marker)
            ax.annotate(name, (xv, success), fontsize=7, xytext=(3, 3),
                        textcoords='offset points')
    ax_s.set_xlabel('realized sparsity (gated chunks; DDIM: 1 - K / K_dense)')
    ax_t.set_xlabel('mean chunk latency (ms, batch 1)')
    for ax in (ax_s, ax_t):
        ax.set_ylabel('success rate')
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    fig.suptitle(f'{report["task"]}: {report["episodes"]} episodes from seed '
                 f'{report["seed_start"]}')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
