"""Gate maps: from pruner logits (or a baseline rule) to one choice per (step, unit).

A gate map is an integer tensor (K, U) with values in {0 compute, 1 reuse-forward,
2 reuse-timestep, 3 reuse-rollout} (batch 1), or one-hot gates (B, K, U, 4) for the batched,
differentiable path. Two rules always hold: step 0 computes every unit (it fills the forward
and timestep caches), and the first chunk after a reset computes everything (it fills the
rollout cache); callers apply the latter with :func:`dense_gates`.
"""

from functools import lru_cache
from typing import Optional
from typing import Sequence

from sparse_policy_node.core.cache import CHOICE_NAMES
from sparse_policy_node.core.cache import COMPUTE
from sparse_policy_node.core.cache import REUSE_TIMESTEP
from sparse_policy_node.core.config import REUSE_DIRECTIONS
import torch

NUM_CHOICES = 4


def allowed_choices(directions: Sequence[str]) -> torch.Tensor:
    """(4,) bool mask of allowed choices: compute plus the allowed reuse directions."""
    allowed = torch.zeros(NUM_CHOICES, dtype=torch.bool)
    allowed[COMPUTE] = True
    for d in directions:
        allowed[1 + REUSE_DIRECTIONS.index(d)] = True
    return allowed


@lru_cache(maxsize=32)
def _allowed_on(directions: tuple, device: torch.device) -> torch.Tensor:
    # One copy per (directions, device) for the life of the process: building the mask on the
    # host and copying it to a GPU on every chunk stalls the pruner's stream (issue 14).
    return allowed_choices(directions).to(device)


def allowed_choices_on(directions: Sequence[str], device) -> torch.Tensor:
    """(4,) bool mask of :func:`allowed_choices` resident on ``device`` (cached, read-only)."""
    return _allowed_on(tuple(directions), torch.device(device))


def dense_gates(num_steps: int, num_units: int) -> torch.Tensor:
    """(K, U) gate map that computes everything."""
    return torch.zeros(num_steps, num_units, dtype=torch.long)


def argmax_gates(logits: torch.Tensor, directions: Sequence[str]) -> torch.Tensor:
    """Learned gates as trained: argmax over allowed choices, step 0 forced to compute.

    Args:
        logits: (..., K, U, 4) pruner logits.
        directions: allowed reuse directions.

    Returns:
        (..., K, U) integer gate map.
    """
    mask = allowed_choices_on(directions, logits.device)
    gates = logits.masked_fill(~mask, float('-inf')).argmax(dim=-1)
    gates[..., 0, :] = COMPUTE
    return gates


def dial_gates(logits: torch.Tensor, sparsity: float,
               directions: Sequence[str]) -> torch.Tensor:
    """Keep exactly the ``1 - sparsity`` share of entries the pruner most wants to compute.

    The compute preference of an entry is its compute logit minus its best allowed reuse
    logit. Step 0 always computes and counts towards the kept share; the remaining budget goes
    to the highest-preference entries of steps 1..K-1; every other entry reuses from its best
    allowed direction.

    Args:
        logits: (K, U, 4) pruner logits of one sample.
        sparsity: target share of reused entries in [0, 0.99].
        directions: allowed reuse directions.

    Returns:
        (K, U) integer gate map with ``round((1 - sparsity) * K * U)`` computed entries
        (at least the U entries of step 0).
    """
    K, U, _ = logits.shape
    mask = allowed_choices_on(directions, logits.device)
    reuse_logits = logits.masked_fill(~mask, float('-inf'))[..., 1:]  # (K, U, 3)
    best_reuse, best_dir = reuse_logits.max(dim=-1)  # (K, U)
    gates = best_dir + 1
    gates[0] = COMPUTE
    budget = max(U, int(round((1.0 - sparsity) * K * U))) - U
    if budget > 0 and K > 1:
        preference = (logits[1:, :, COMPUTE] - best_reuse[1:]).flatten()  # ((K-1) * U,)
        keep = torch.topk(preference, min(budget, preference.numel())).indices
        rest = gates[1:].flatten()
        rest[keep] = COMPUTE
        gates[1:] = rest.view(K - 1, U)
    return gates


def static_gates(num_steps: int, num_units: int, sparsity: float) -> torch.Tensor:
    """FORA-style baseline: compute every unit on evenly spaced steps, else reuse (timestep).

    The number of computed steps is ``round((1 - sparsity) * K)`` (at least 1, step 0
    included), which matches the requested sparsity up to one step.

    Returns:
        (K, U) integer gate map.
    """
    n_compute = max(1, int(round((1.0 - sparsity) * num_steps)))
    steps = torch.linspace(0, num_steps - 1, n_compute).round().long().unique()
    gates = torch.full((num_steps, num_units), REUSE_TIMESTEP, dtype=torch.long)
    gates[steps] = COMPUTE
    gates[0] = COMPUTE
    return gates


def random_gates(num_steps: int, num_units: int, sparsity: float, directions: Sequence[str],
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random gates at an exact sparsity (speed studies): uniform kept entries and directions.

    Returns:
        (K, U) integer gate map with the same kept count as :func:`dial_gates`.
    """
    choices = [1 + REUSE_DIRECTIONS.index(d) for d in directions]
    idx = torch.randint(0, len(choices), (num_steps, num_units), generator=generator)
    gates = torch.tensor(choices, dtype=torch.long)[idx]
    gates[0] = COMPUTE
    budget = max(num_units, int(round((1.0 - sparsity) * num_steps * num_units))) - num_units
    if budget > 0 and num_steps > 1:
        perm = torch.randperm((num_steps - 1) * num_units, generator=generator)[:budget]
        rest = gates[1:].flatten()
        rest[perm] = COMPUTE
        gates[1:] = rest.view(num_steps - 1, num_units)
    return gates


def straight_through_gates(logits: torch.Tensor, directions: Sequence[str]) -> torch.Tensor:
    """Training gates: one-hot argmax forward, softmax gradient backward (STE).

    Step 0's probabilities are overwritten with compute *before* the estimator, so step 0
    gets no gradient (as in the paper).

    Args:
        logits: (B, K, U, 4) pruner logits.
        directions: allowed reuse directions (disallowed choices get probability 0).

    Returns:
        (B, K, U, 4) gates whose values are exactly one-hot.
    """
    mask = allowed_choices_on(directions, logits.device)
    probs = torch.softmax(logits.masked_fill(~mask, float('-inf')), dim=-1)
    forced = torch.zeros_like(probs[:, :1])
    forced[..., COMPUTE] = 1.0
    probs = torch.cat((forced, probs[:, 1:]), dim=1)
    hard = torch.nn.functional.one_hot(probs.argmax(dim=-1), NUM_CHOICES).to(probs.dtype)
    return hard - probs.detach() + probs


def gate_counts(gates: torch.Tensor) -> dict:
    """Count each choice in an integer gate map; adds ``realized_sparsity``."""
    counts = torch.bincount(gates.flatten().cpu(), minlength=NUM_CHOICES).tolist()
    total = max(1, sum(counts))
    out = {name: int(c) for name, c in zip(CHOICE_NAMES, counts)}
    out['realized_sparsity'] = 1.0 - counts[COMPUTE] / total
    return out
