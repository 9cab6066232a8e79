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
"""

from typing import List
from typing import Optional
from typing import Tuple
from typing import Union

import torch

COMPUTE, REUSE_FORWARD, REUSE_TIMESTEP, REUSE_ROLLOUT = 0, 1, 2, 3
CHOICE_NAMES = ('compute', 'forward', 'timestep', 'rollout')


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

    def rollout_age(self, step: int, unit: int) -> Union[int, torch.Tensor]:
        """Age in chunks of rollout slot (step, unit) during the current chunk (int or (B,))."""
        return self.chunk - self.written[step][unit]

    def rollout_fresh(self, step: int, unit: int) -> bool:
        """Batch 1: True when rollout slot (step, unit) is filled and not older than max_age."""
        if self.rollout[step][unit] is None:
            return False
        return self.max_age <= 0 or self.chunk - self.written[step][unit] <= self.max_age

    def rollout_ages(self) -> List[int]:
        """Ages (chunks) of every filled rollout slot, batch 1 (statistics)."""
        return [self.chunk - int(w) for row, wrow in zip(self.rollout, self.written)
                for v, w in zip(row, wrow) if v is not None and not torch.is_tensor(w)]

    def store(self, step: int, unit: int, value: torch.Tensor) -> None:
        """Refresh all three directions with a computed (B, T_a, D) branch output."""
        self.forward[unit % 3] = value
        self.timestep[unit] = value
        self.rollout[step][unit] = value
        self.written[step][unit] = self.chunk

    def lookup(self, choice: int, step: int, unit: int) -> Optional[torch.Tensor]:
        """Return the cached (B, T_a, D) value for a reuse ``choice`` (None: empty slot)."""
        if choice == REUSE_FORWARD:
            return self.forward[unit % 3]
        if choice == REUSE_TIMESTEP:
            return self.timestep[unit]
        if choice == REUSE_ROLLOUT:
            return self.rollout[step][unit] if self.rollout_fresh(step, unit) else None
        raise ValueError(f'reuse choice must be 1, 2 or 3, got {choice!r}')

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
