"""Evaluation variants: the name grammar, and the one place each variant is built.

``sparse-policy eval``, ``frontier`` and the pruner's closed-loop choice name the ways of
serving a model with these strings. :func:`variant_runtime` turns a name into the
:class:`RuntimeConfig` that serves it and :func:`make_variant` into a policy-like object with
``reset()`` and ``predict_action(obs) -> {'action': (1, n, A), ...}``.

================  ===========================================================================
``default``       the model's serving default (``serving.json``, written by
                  ``sparse-policy frontier --install``); without one, learned gates on the
                  pruner's schedule, or dense
``dense``         every unit at every step, the model's own sampler and K
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

``P`` defaults to the ablation sparsity (:data:`MATCHED_SPARSITY`, the shipped pruners'
target). The single-direction ablations restrict the *omni-trained* pruner's preferences to
one direction at matched sparsity; the paper trains one binary pruner per direction instead
(tts_method.md §6.4), which is costlier and favours each ablation somewhat more.

Without a suffix, sampler and K of the pruner variants default to the ``sampler`` / ``steps``
options, else to the schedule of the model's first pruner (its metadata); dense variants to
the options, else to the model's own schedule.
"""

import re
from typing import Dict
from typing import List
from typing import Optional
from typing import Tuple

from sparse_policy_node.core.config import MATCHED_SPARSITY
from sparse_policy_node.core.config import REUSE_DIRECTIONS
from sparse_policy_node.core.config import RuntimeConfig
from sparse_policy_node.training.deviation import DeviationProbe
from sparse_policy_node.training.sparse_eval import SparseVariant
import torch

ONLY = {f'only-{d}': d for d in REUSE_DIRECTIONS}
_NUMBER = r'\d+(?:\.\d+)?'
_SCHEDULE = r'(?:@(?:ddpm|ddim)-\d+)?'
_PATTERN = re.compile(rf'^(default|ddim-\d+|(?:dense|sparse|omni|only-forward|only-timestep|'
                      rf'only-rollout|dial-{_NUMBER}|static(?:-{_NUMBER})?|'
                      rf'random(?:-{_NUMBER})?){_SCHEDULE})$')
USES_PRUNER = ('sparse', 'dial', 'omni', 'only', 'default')
DENSE_KINDS = ('dense', 'ddim')


# ==== the grammar ====

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


def parse_variant(name: str,
                  ablation_sparsity: float = MATCHED_SPARSITY) -> Tuple[str, Optional[float]]:
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


# ==== from a name to what serves it ====

def pruner_schedule(model_dir: str) -> Optional[Tuple[str, int]]:
    """(sampler, K) of the model's top-level pruner, None without a pruner or metadata."""
    from sparse_policy_node.core.checkpoint import has_pruner
    from sparse_policy_node.core.checkpoint import pruner_schedule_of
    from sparse_policy_node.core.checkpoint import read_pruner_metadata
    if not has_pruner(model_dir):
        return None
    return pruner_schedule_of(read_pruner_metadata(model_dir))


def _model_schedule(model_dir: str) -> Tuple[str, int]:
    from sparse_policy_node.core.checkpoint import load_policy_config
    sched = load_policy_config(model_dir).scheduler
    return sched.sampler, sched.num_inference_steps


def variant_runtime(name: str, model_dir: Optional[str], options: Optional[dict] = None,
                    model_schedule: Optional[Tuple[str, int]] = None,
                    pruners: Optional[dict] = None) -> Optional[RuntimeConfig]:
    """Return the :class:`RuntimeConfig` that serves variant ``name`` of ``model_dir``.

    Args:
        name: variant name (module table).
        model_dir: model directory (may be None for ``dense`` / ``ddim-K`` when
            ``model_schedule`` is given).
        options: optional ``sampler``, ``steps``, ``ablation_sparsity``, ``precision``
            (the denoiser's dtype) and ``rollout_max_age`` (None: the max age the schedule's
            pruner was trained with).
        model_schedule: (sampler, K) of the model's own config; read from ``model_dir`` when
            None.
        pruners: the model's pruners by schedule (:func:`load_pruners`), loaded when needed
            and not given.

    Returns:
        The runtime; dense variants have ``sparsity_enabled=False``. ``default`` returns the
        serving default, None when the model has none (the engine's own default then).
    """
    from sparse_policy_node.core.checkpoint import for_schedule
    from sparse_policy_node.core.checkpoint import load_pruners
    from sparse_policy_node.core.checkpoint import trained_max_age
    from sparse_policy_node.core.engine import serving_runtime
    options = options or {}
    kind, param = parse_variant(name, options.get('ablation_sparsity') or MATCHED_SPARSITY)
    precision = options.get('precision') or 'float32'
    if kind == 'default':
        served = serving_runtime(model_dir)
        return None if served is None else served.replace(precision=precision)
    suffix = variant_schedule(name)
    if kind in DENSE_KINDS:
        own = model_schedule or _model_schedule(model_dir)
        sampler, steps = suffix or (options.get('sampler') or own[0],
                                    options.get('steps') or own[1])
        return RuntimeConfig(sparsity_enabled=False, sampler=sampler, num_inference_steps=steps,
                             precision=precision)
    if suffix:
        sampler, steps = suffix
    else:
        trained = pruner_schedule(model_dir) if kind in USES_PRUNER else None
        own = trained or model_schedule or _model_schedule(model_dir)
        sampler = options.get('sampler') or own[0]
        steps = options.get('steps') or own[1]
    if kind == 'sparse':
        knobs = {'gate_source': 'pruner', 'target_sparsity': -1.0}
    elif kind in ('dial', 'omni'):
        knobs = {'gate_source': 'pruner', 'target_sparsity': param}
    elif kind == 'only':
        knobs = {'gate_source': 'pruner', 'target_sparsity': param,
                 'directions': (ONLY[name.partition('@')[0]],)}
    else:  # static / random baselines
        knobs = {'gate_source': kind, 'target_sparsity': param}
    max_age = options.get('rollout_max_age')
    if max_age is None:  # deploy as trained: the max age the schedule's pruner learned with
        if pruners is None:
            pruners = load_pruners(model_dir) if kind in USES_PRUNER else {}
        max_age = trained_max_age(for_schedule(pruners, (sampler, steps)))
    return RuntimeConfig(sampler=sampler, num_inference_steps=steps, rollout_max_age=max_age,
                         precision=precision, **knobs)


class DensePolicy:
    """Dense sampling of a :class:`DiffusionPolicy` with an optional sampler override."""

    def __init__(self, policy, sampler: str = None, steps: int = None):
        self.policy = policy
        sched = policy.config.scheduler
        self.sampler = sampler or sched.sampler
        self.steps = steps or sched.num_inference_steps
        policy.scheduler.set_timesteps(self.steps, self.sampler)

    def reset(self) -> None:
        """Nothing to clear between episodes."""

    def predict_action(self, obs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """One dense chunk; noise comes from torch's global generator."""
        sched = self.policy.scheduler
        if (sched.sampler, sched.num_steps) != (self.sampler, self.steps):
            sched.set_timesteps(self.steps, self.sampler)  # several variants, one policy
        return self.policy.predict_action(obs)


def policy_device(policy) -> torch.device:
    """Return the device of a policy's weights (pruners are loaded next to it)."""
    return next(policy.parameters()).device


def make_variant(name: str, policy, options: dict):
    """Build the policy-like object of variant ``name`` (module table).

    Args:
        name: variant name.
        policy: the loaded :class:`DiffusionPolicy`.
        options: ``model`` (directory; needed by every variant but dense ones), and the
            options of :func:`variant_runtime` (``precision``: a dense variant below float32
            runs on the engine with sparsity off).

    Returns:
        :class:`DensePolicy` for ``dense`` / ``ddim-K``, else a :class:`SparseVariant`
        (the engine at batch 1, so units are truly skipped).
    """
    from sparse_policy_node.core.checkpoint import load_pruners
    sched = policy.config.scheduler
    own = (sched.sampler, sched.num_inference_steps)
    kind, _ = parse_variant(name)
    if kind in DENSE_KINDS:
        runtime = variant_runtime(name, options.get('model'), options, own)
        if runtime.precision == 'float32':
            return DensePolicy(policy, runtime.sampler, runtime.num_inference_steps)
        return SparseVariant(policy, {}, runtime)  # the engine casts the denoiser
    pruners = load_pruners(options['model'], policy_device(policy)) \
        if kind in USES_PRUNER else {}
    runtime = variant_runtime(name, options['model'], options, own, pruners)
    return SparseVariant(policy, pruners, runtime)


def make_probed(policy, name: str, options: dict):
    """Build variant ``name``, wrapped in a :class:`DeviationProbe` unless ``no_deviation``."""
    inner = make_variant(name, policy, options)
    return inner if options.get('no_deviation') else DeviationProbe(inner, policy)


def describe_variant(variant) -> str:
    """Say what a built variant runs: its schedule and gates (``ddim-5 pruner``)."""
    engine = getattr(variant, 'engine', None)
    if engine is None:
        return f'{variant.sampler}-{variant.steps} dense'
    rt = engine.runtime
    if not rt.sparsity_enabled or rt.gate_source == 'dense':
        gates = 'dense'
    elif rt.target_sparsity < 0:
        gates = rt.gate_source
    else:
        gates = f'{rt.gate_source} {rt.target_sparsity:.2f}'
    if len(rt.directions) < 3 and gates != 'dense':
        gates += ' ' + '+'.join(rt.directions)
    return f'{rt.sampler}-{rt.num_inference_steps} {gates}'


def check_variants(model_dir: str, variants: List[str], options: dict) -> Dict[str, str]:
    """Build every variant once on the CPU, without a simulator, and close it again.

    A variant that cannot run (learned gates on a schedule without a pruner, a K above the
    model's training timesteps, a missing serving default...) raises its error here, before
    any episode starts.

    Returns:
        ``{variant: what it runs}`` (:func:`describe_variant`).
    """
    from sparse_policy_node.core.checkpoint import load_policy
    policy = load_policy(model_dir)
    runs = {}
    for name in variants:
        variant = make_variant(name, policy, dict(options, model=model_dir))
        runs[name] = describe_variant(variant)
        if hasattr(variant, 'close'):
            variant.close()
    return runs
