"""Closed-loop choice between a pruner run's checkpoints (``train-pruner --closed-loop-*``).

Validation loss alone picks checkpoints that lose episodes: the loss mixes fidelity with the
distance to the target sparsity, and a fidelity difference of a few percent does not say
whether the arm still lifts the cube. So the run's ``best/`` (lowest validation loss) and
``last/`` pruners are each rolled out in the simulator with their learned gates as trained, on
a seed range of their own (keep it apart from the rollout, evaluation and frontier seeds), and
the one with the higher success, then the shorter successful episodes, is chosen.
"""

import json
import os
import shutil
from typing import List

from sparse_policy_node.core.checkpoint import load_pruner
from sparse_policy_node.core.checkpoint import POLICY_CONFIG
from sparse_policy_node.core.checkpoint import POLICY_WEIGHTS
from sparse_policy_node.core.checkpoint import PRUNER_CONFIG
from sparse_policy_node.core.checkpoint import PRUNER_WEIGHTS
from sparse_policy_node.core.checkpoint import schedule_name

CANDIDATES = ('best', 'last')


def candidate_model(model_dir: str, pruner_dir: str, dest: str) -> str:
    """Write a model directory: ``model_dir``'s policy with the pruner of ``pruner_dir``."""
    os.makedirs(dest, exist_ok=True)
    for name in (POLICY_CONFIG, POLICY_WEIGHTS):
        shutil.copyfile(os.path.join(model_dir, name), os.path.join(dest, name))
    for name in (PRUNER_CONFIG, PRUNER_WEIGHTS):
        shutil.copyfile(os.path.join(pruner_dir, name), os.path.join(dest, name))
    return dest


def select_closed_loop(model_dir: str, run_dir: str, seeds: List[int],
                       rollout_max_age: int = 0, workers: int = 1,
                       max_steps: int = None, progress: bool = True) -> dict:
    """Roll out the run's candidates with their learned gates; choose one.

    Returns:
        ``chosen`` ('best' or 'last'), per candidate ``success`` / ``steps_success`` /
        ``chunk_ms`` / ``realized_sparsity``, the variant and the seeds; also written to
        ``run_dir/closed_loop.json``.
    """
    import numpy as np
    from sparse_policy_node.training.evaluate import evaluate_variant
    from sparse_policy_node.training.evaluate import model_task
    task = model_task(model_dir)
    results, variant = {}, None
    for which in CANDIDATES:
        pruner_dir = os.path.join(run_dir, which)
        schedule = load_pruner(pruner_dir).schedule
        variant = 'sparse' + (f'@{schedule_name(*schedule)}' if schedule else '')
        model = candidate_model(model_dir, pruner_dir,
                                os.path.join(run_dir, f'closed_loop_{which}'))
        episodes = evaluate_variant(model, seeds, task, variant,
                                    {'rollout_max_age': rollout_max_age, 'no_deviation': True},
                                    max_steps, workers, progress=progress)
        wins = [e['steps'] for e in episodes if e['success']]
        results[which] = {
            'success': float(np.mean([e['success'] for e in episodes])),
            'steps_success': float(np.mean(wins)) if wins else None,
            'chunk_ms': float(np.mean([e['chunk_ms'] for e in episodes])),
            'realized_sparsity': float(np.mean([e.get('realized_sparsity', 0.0)
                                                for e in episodes]))}
    chosen = max(CANDIDATES, key=lambda w: (results[w]['success'],
                                            -(results[w]['steps_success'] or 1e9)))
    summary = {'chosen': chosen, 'variant': variant, 'rollout_max_age': rollout_max_age,
               'seed_start': seeds[0], 'episodes': len(seeds), 'candidates': results}
    with open(os.path.join(run_dir, 'closed_loop.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    return summary
