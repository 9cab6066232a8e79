"""The three feature caches of omnidirectional reuse (tts_method.md §6).

For chunk (control step) r, denoising step k and unit b = 3 l + j:

==========  =======================  ==========  =====================================
direction   slot                      slots       lifetime
==========  =======================  ==========  =====================================
forward F   unit kind j (SA/CA/FFN)   3           cleared at the start of every chunk
timestep T  unit b                    U           cleared at the start of every chunk
rollout R   (step k, unit b)          K * U       kept across chunks until reset()
==========  =======================  ==========  =====================================

Computing a unit refreshes all three slots with its branch output; reusing refreshes none.
Slots hold references to branch outputs (no copies), so memory is bounded by
``(3 + U + K * U)`` tensors of (B, T_a, D) whatever the number of chunks. The rollout cache is
tied to one inference schedule (sampler, K); a schedule change clears it, so the next chunk
runs dense again.

Slot ages (cache aging). Chunks are numbered from 0 since the rollout cache was last filled
from empty; each rollout slot remembers the number of the chunk that wrote it, and its *age*
during chunk c is ``c - written``. With ``max_age = A > 0`` a rollout reuse whose slot is older
than ``A`` chunks counts as an empty slot: the unit computes instead (and refreshes the slot).
``max_age = 0`` never expires a slot (the paper's semantics). In the batched path the written
chunk is kept per sample, as a (B,) tensor.

This module is the one home of the reuse rules: which slot a gate reads (:meth:`FeatureCache.
source`), when a reuse falls back to compute (empty or expired slot), what a computed unit
writes (:meth:`FeatureCache.store`), in three forms over one slot layout: per unit on the host
(batch-1 eager loop and the step graphs of :mod:`cuda_graphs`), per sample (the batched soft
path: :meth:`FeatureCache.soft_candidates`, :func:`soft_mix`, :meth:`FeatureCache.store_where`)
and for a whole chunk on the device (:func:`chunk_plan`, the whole-chunk graph of
:mod:`chunk_graph`). ``test_core_reuse.py`` checks the forms against each other.
"""

from typing import List
from typing import Optional
from typing import Tuple
from typing import Union

import torch

COMPUTE, REUSE_FORWARD, REUSE_TIMESTEP, REUSE_ROLLOUT = 0, 1, 2, 3
CHOICE_NAMES = ('compute', 'forward', 'timestep', 'rollout')


class RolloutAgeStats:
    """Ages of the rollout-cache slots one batch-1 chunk reused, and the slots that expired."""

    def __init__(self):
        self.reused = 0
        self.age_sum = 0
        self.age_max = 0
        self.expired = 0

    def add(self, age: int) -> None:
        """Count one rollout reuse of a slot ``age`` chunks old."""
        self.reused += 1
        self.age_sum += age
        self.age_max = max(self.age_max, age)

    def add_plan(self, plan: dict) -> None:
        """Count the rollout reuses and expiries of a :func:`chunk_plan` (reads the device)."""
        reused = plan['executed'] == REUSE_ROLLOUT
        ages = plan['age'][reused]
        self.reused += int(reused.sum())
        self.age_sum += int(ages.sum())
        self.age_max = max(self.age_max, int(ages.max()) if ages.numel() else 0)
        self.expired += int(plan['expired'].sum())

    def as_dict(self) -> dict:
        """``rollout_age_mean`` / ``rollout_age_max`` of reused slots, ``rollout_expired``."""
        return {'rollout_age_mean': self.age_sum / self.reused if self.reused else 0.0,
                'rollout_age_max': self.age_max, 'rollout_expired': self.expired}


class FeatureCache:
    """Forward / timestep / rollout caches for one policy instance (one robot)."""

    def __init__(self, num_units: int):
        self.num_units = num_units
        self.forward: List[Optional[torch.Tensor]] = [None] * 3
        self.timestep: List[Optional[torch.Tensor]] = [None] * num_units
        self.rollout: List[List[Optional[torch.Tensor]]] = []
        # chunk number that wrote each rollout slot: an int, or (B,) per sample (batched path)
        self.written: List[List[Union[int, torch.Tensor]]] = []
        self.schedule: Optional[Tuple] = None
        self.chunks_since_reset = 0
        self.max_age = 0

    def reset(self) -> None:
        """Start a new episode: clear every slot; the next chunk must be dense."""
        self.forward = [None] * 3
        self.timestep = [None] * self.num_units
        self.rollout = []
        self.written = []
        self.schedule = None
        self.chunks_since_reset = 0

    @property
    def chunk(self) -> int:
        """Number of the current chunk since the rollout cache was filled (0: the dense one)."""
        return self.chunks_since_reset - 1

    def begin_chunk(self, schedule: Tuple, num_steps: int, max_age: int = 0) -> bool:
        """Prepare for a new chunk of ``num_steps`` steps on inference ``schedule``.

        ``schedule`` identifies what the rollout cache depends on (sampler, timesteps, batch
        size). Clears the per-chunk caches (F, T), and the rollout cache too when the schedule
        differs from the one it was filled with. ``max_age`` (chunks, 0: never) applies to the
        rollout slots during this chunk.

        Returns:
            True when the chunk must run dense (first chunk since reset or schedule change).
        """
        self.forward = [None] * 3
        self.timestep = [None] * self.num_units
        if schedule != self.schedule:
            self.rollout = [[None] * self.num_units for _ in range(num_steps)]
            self.written = [[0] * self.num_units for _ in range(num_steps)]
            self.schedule = schedule
            self.chunks_since_reset = 0
        if max_age < 0:
            raise ValueError(f'max_age must be >= 0 (0: never expire), got {max_age!r}')
        self.max_age = int(max_age)
        must_be_dense = self.chunks_since_reset == 0
        self.chunks_since_reset += 1
        return must_be_dense

    # ==== the rules, per unit (batch 1 on the host) ====

    def _slots(self, step: int, unit: int) -> tuple:
        # The three (slot list, index) a computed unit (step, unit) refreshes, in choice order
        # forward, timestep, rollout: the forward slot is shared by the unit's kind (SA / CA /
        # FFN), the timestep slot by the unit over steps, the rollout slot is its own.
        return ((self.forward, unit % 3), (self.timestep, unit), (self.rollout[step], unit))

    def rollout_age(self, step: int, unit: int) -> Union[int, torch.Tensor]:
        """Age in chunks of rollout slot (step, unit) during the current chunk (int or (B,))."""
        return self.chunk - self.written[step][unit]

    def rollout_fresh(self, step: int, unit: int) -> bool:
        """Batch 1: True when rollout slot (step, unit) is filled and not older than max_age."""
        return self.source(REUSE_ROLLOUT, step, unit) is not None

    def rollout_ages(self) -> List[int]:
        """Ages (chunks) of every filled rollout slot, batch 1 (statistics)."""
        return [self.chunk - int(w) for row, wrow in zip(self.rollout, self.written)
                for v, w in zip(row, wrow) if v is not None and not torch.is_tensor(w)]

    def source(self, choice: int, step: int, unit: int,
               ages: Optional[RolloutAgeStats] = None) -> Optional[torch.Tensor]:
        """Return the (B, T_a, D) value gate ``choice`` reuses at (step, unit); None: compute.

        None for ``COMPUTE``, for an empty slot, and (batch 1) for a rollout slot older than
        ``max_age`` chunks; ``ages`` counts the rollout reuses and the expiries.
        """
        if choice == COMPUTE:
            return None
        if choice not in (REUSE_FORWARD, REUSE_TIMESTEP, REUSE_ROLLOUT):
            raise ValueError(f'choice must be 0, 1, 2 or 3, got {choice!r}')
        slots, index = self._slots(step, unit)[choice - 1]
        value = slots[index]
        if choice == REUSE_ROLLOUT and value is not None:
            age = self.chunk - self.written[step][unit]
            if self.max_age and age > self.max_age:
                if ages is not None:
                    ages.expired += 1
                return None
            if ages is not None:
                ages.add(age)
        return value

    def lookup(self, choice: int, step: int, unit: int) -> Optional[torch.Tensor]:
        """Return the cached (B, T_a, D) value for a reuse ``choice`` (None: empty slot)."""
        if choice == COMPUTE:
            raise ValueError(f'reuse choice must be 1, 2 or 3, got {choice!r}')
        return self.source(choice, step, unit)

    def store(self, step: int, unit: int, value: torch.Tensor) -> None:
        """Refresh all three directions with a computed (B, T_a, D) branch output."""
        for slots, index in self._slots(step, unit):
            slots[index] = value
        self.written[step][unit] = self.chunk

    def store_from(self, buffers: 'FeatureCache', step: int, unit: int) -> None:
        """Record a unit computed into ``buffers``' slots: point this cache's slots at them."""
        for (slots, index), (src, _) in zip(self._slots(step, unit),
                                            buffers._slots(step, unit)):
            slots[index] = src[index]
        self.written[step][unit] = self.chunk

    def copy_in(self, step: int, unit: int, value: torch.Tensor) -> None:
        """Copy a computed branch output into the three (static buffer) slots it refreshes."""
        for slots, index in self._slots(step, unit):
            slots[index].copy_(value)

    def take_chunk(self, src: 'FeatureCache') -> None:
        """Record a whole dense chunk computed into ``src``: every slot refreshed this chunk."""
        self.forward = list(src.forward)
        self.timestep = list(src.timestep)
        for k, row in enumerate(src.rollout):
            self.rollout[k] = list(row)
            self.written[k] = [self.chunk] * self.num_units

    # ==== the rules, per sample (the batched soft path) ====

    def soft_candidates(self, step: int, unit: int) -> tuple:
        """Return the (B, T_a, D) forward, timestep and rollout values (None: empty slot)."""
        return tuple(slots[index] for slots, index in self._slots(step, unit))

    def rollout_fresh_mask(self, step: int, unit: int, batch: int) -> Optional[torch.Tensor]:
        """(B,) bool: rollout slot not older than max_age, per sample; None when no limit."""
        value = self.rollout[step][unit]
        if not self.max_age or value is None:
            return None
        age = self.chunk - self.written[step][unit]
        if not torch.is_tensor(age):
            age = torch.full((batch,), age, dtype=torch.long, device=value.device)
        return age <= self.max_age

    def store_where(self, step: int, unit: int, value: torch.Tensor,
                    computed: torch.Tensor) -> None:
        """Refresh the three slots of the samples that computed; ``computed``: (B,) bool.

        An empty slot is filled for every sample (the soft path computes every unit for every
        sample, so ``value`` is each sample's own branch output). The rollout slot's written
        chunk becomes per sample, a (B,) tensor.
        """
        if self.rollout[step][unit] is None:
            self.written[step][unit] = self.chunk
        else:
            old = self.written[step][unit]
            if not torch.is_tensor(old):
                old = torch.full(computed.shape, old, dtype=torch.long, device=computed.device)
            self.written[step][unit] = torch.where(computed, self.chunk, old)
        mask = computed[:, None, None]  # (B, 1, 1)
        for slots, index in self._slots(step, unit):
            old = slots[index]
            slots[index] = value if old is None else torch.where(mask, value, old)

    # ==== upkeep ====

    def num_tensors(self) -> int:
        """Count the filled slots (for memory-boundedness checks)."""
        filled = sum(v is not None for v in self.forward)
        filled += sum(v is not None for v in self.timestep)
        filled += sum(v is not None for row in self.rollout for v in row)
        return filled

    def detach_(self) -> None:
        """Detach every cached tensor (training carries R across frames without gradients)."""
        self.forward = [None if v is None else v.detach() for v in self.forward]
        self.timestep = [None if v is None else v.detach() for v in self.timestep]
        self.rollout = [[None if v is None else v.detach() for v in row] for row in self.rollout]

    def narrow_(self, n: int) -> None:
        """Keep the first ``n`` samples of every cached (B, ...) tensor (batched training)."""
        self.forward = [None if v is None else v[:n] for v in self.forward]
        self.timestep = [None if v is None else v[:n] for v in self.timestep]
        self.rollout = [[None if v is None else v[:n] for v in row] for row in self.rollout]
        self.written = [[w[:n] if torch.is_tensor(w) else w for w in row]
                        for row in self.written]


def soft_mix(x: torch.Tensor, d: torch.Tensor, gate: torch.Tensor, candidates: tuple,
             rollout_fresh: Optional[torch.Tensor] = None):
    """Soft-gated unit update ``x + g_C d + g_F F + g_T T + g_R R`` with the fallbacks.

    An empty candidate falls back to compute (as the hard path does), so its gate weight
    moves to ``d``; so does the rollout weight of samples whose rollout slot expired.

    Args:
        x: (B, T_a, D) residual stream; d: (B, T_a, D) the unit's branch output.
        gate: (B, 4) one-hot valued gates (straight-through in training).
        candidates: :meth:`FeatureCache.soft_candidates` of the unit.
        rollout_fresh: (B,) bool or None, :meth:`FeatureCache.rollout_fresh_mask`.

    Returns:
        (x, g_compute): the updated (B, T_a, D) stream and the (B,) weight of ``d``.
    """
    g_compute = gate[:, COMPUTE]
    g = [gate[:, c] for c in range(1, 4)]
    if rollout_fresh is not None and candidates[2] is not None:
        fresh = rollout_fresh.to(gate.dtype)
        g_compute = g_compute + g[2] * (1.0 - fresh)
        g[2] = g[2] * fresh
    for c, value in enumerate(candidates):
        if value is None:
            g_compute = g_compute + g[c]
    x = x + g_compute[:, None, None] * d
    for c, value in enumerate(candidates):
        if value is not None:
            x = x + g[c][:, None, None] * value
    return x, g_compute


# ==== the rules, for a whole batch-1 chunk on the device ====

def chunk_plan(gates: torch.Tensor, filled: torch.Tensor, written: torch.Tensor,
               chunk: torch.Tensor, max_age: torch.Tensor) -> dict:
    """Plan a whole batch-1 chunk: executed choices and reuse sources, as device tensors.

    The per-unit rules applied to a whole (K, U) gate map at once, with no host round trip
    (no ``.item()``, no Python branch on a tensor). The caches are one store of K * U rollout
    slots, slot n = k U + b holding the last output computed at (k, b): a unit that computes
    writes its own slot, and the forward and timestep caches are pointers into the store
    (the forward slot of kind j is the last unit of kind j computed before, in execution
    order; the timestep slot of unit b is the last step that computed b), so they hold the
    same values as :class:`FeatureCache`'s slots. Step 0 computes every unit, so a forward or
    timestep reuse never finds an empty slot after it; a rollout reuse of an empty slot, or of
    a slot older than ``max_age`` chunks, computes instead.

    Args:
        gates: (K, U) long gate map (row 0 is ignored: step 0 computes).
        filled: (K, U) bool, rollout slot filled by an earlier chunk.
        written: (K, U) long, chunk number that last wrote each rollout slot.
        chunk: () long, this chunk's number (see :attr:`FeatureCache.chunk`).
        max_age: () long, rollout max age in chunks (0: never expires).

    Returns:
        ``executed`` (K, U) long choices run, ``compute`` (K, U) bool, ``source`` (K, U) long
        store slot each unit adds (its own slot when it computes or reuses its rollout slot),
        ``age`` (K, U) long age of each rollout slot, ``expired`` (K, U) bool rollout reuses
        that computed because their slot was too old.
    """
    K, U = gates.shape
    step = torch.arange(K, device=gates.device)[:, None]  # (K, 1)
    executed = torch.where(step == 0, COMPUTE, gates)
    age = chunk - written
    fresh = filled & ((max_age <= 0) | (age <= max_age))
    wants_rollout = executed == REUSE_ROLLOUT
    expired = wants_rollout & filled & ~fresh
    executed = torch.where(wants_rollout & ~fresh, COMPUTE, executed)
    compute = executed == COMPUTE
    own = torch.arange(K * U, device=gates.device).view(K, U)  # slot n = k U + b
    last = torch.where(compute, own, -1)
    # timestep source: the last earlier step that computed the unit
    by_step = last.cummax(dim=0).values  # (K, U) inclusive
    timestep = torch.cat([torch.full_like(by_step[:1], -1), by_step[:-1]])
    # forward source: the last earlier unit of the same kind, in execution order (k, b)
    L = U // 3
    by_kind = last.view(K, L, 3).permute(2, 0, 1).reshape(3, K * L)  # (3, K L) in order
    inclusive = by_kind.cummax(dim=1).values
    exclusive = torch.cat([torch.full_like(inclusive[:, :1], -1), inclusive[:, :-1]], dim=1)
    forward = exclusive.view(3, K, L).permute(1, 2, 0).reshape(K, U)
    source = torch.where(executed == REUSE_FORWARD, forward,
                         torch.where(executed == REUSE_TIMESTEP, timestep, own))
    return {'executed': executed, 'compute': compute, 'source': source, 'age': age,
            'expired': expired}


def advance_rollout(plan: dict, filled: torch.Tensor, written: torch.Tensor,
                    chunk: torch.Tensor) -> None:
    """After a chunk of ``plan``: mark the slots it computed as filled by ``chunk`` (in place)."""
    filled.logical_or_(plan['compute'])
    written.copy_(torch.where(plan['compute'], chunk, written))
