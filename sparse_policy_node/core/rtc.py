"""Real-time chunking (RTC) for DDPM/DDIM: inpaint the committed prefix while denoising.

Black et al. 2025 ("Real-Time Execution of Action Chunking Flow Policies") sample the next
chunk while the current one runs. Inference takes ``d`` control steps, so the first ``d``
actions of the new chunk are the ones already committed (they will run whatever the new
chunk says); the rest of the overlap with the current chunk is pulled towards it with soft
weights, and the tail after the overlap is free::

    current chunk  |c0 |c1 |c2 |c3 |c4 |c5 |c6 |c7 |
    new chunk (observed at c2, arrives d = 2 steps later)
                           |n0 |n1 |n2 |n3 |n4 |n5 |n6 |n7 |
    weight                 | 1 | 1 |.57|.29|.11|.03| 0 | 0 |
                           frozen  |soft overlap   | free

The paper does it with guidance (a vector-Jacobian product through the flow network per
step). Here it is *replacement* (RePaint-style inpainting): after every reverse step the
overlap of the sample is moved to the committed actions noised to the step's level,

    x[i] <- w_i * (sqrt(a) * y[i] + sqrt(1 - a) * eps[i]) + (1 - w_i) * x[i]

with ``a`` the cumulative alpha of the level just reached (1 after the last step, so a
frozen step ends exactly at the committed action) and ``eps`` the chunk's own initial noise
(deterministic: seeded noise replays the same chunk). Replacement needs no backward pass, so
it keeps the sparse engine's skipping loop, its learned gates and caches unchanged, and runs
on every backend; guidance would cost a backward pass through the denoiser per step.

Everything is in the policy's normalized action space: :meth:`Prefix.inpainter` maps
committed actions there with the policy's own normalizer.
"""

from dataclasses import dataclass
import math
from typing import Optional

import torch


def rtc_weights(n: int, d: int, overlap: int) -> torch.Tensor:
    """Soft prefix weights of the RTC paper (its eq. 5), with ``overlap = H - s``.

    Args:
        n: length of the new chunk (the paper's H).
        d: frozen steps (the inference delay in control steps), weight 1.
        overlap: steps of the new chunk the current chunk still covers (the paper's H - s);
            steps in ``[d, overlap)`` get ``c (e^c - 1) / (e - 1)`` with
            ``c = (overlap - i) / (overlap - d + 1)``, later ones 0.

    Returns:
        (n,) float32 weights.
    """
    if not 0 <= d <= overlap <= n:
        raise ValueError(f'rtc weights need 0 <= d <= overlap <= n, got d={d}, '
                         f'overlap={overlap}, n={n}')
    w = torch.zeros(n)
    for i in range(n):
        if i < d:
            w[i] = 1.0
        elif i < overlap:
            c = (overlap - i) / (overlap - d + 1)
            w[i] = c * math.expm1(c) / math.expm1(1.0)
    return w


def prefix_from(committed, d: int, n: int) -> Optional['Prefix']:
    """Build the prefix of the next chunk from what the executing chunk will still run.

    Args:
        committed: (m, A) actions (array-like) the current chunk covers from the new
            chunk's step 0 on, or None; m is the overlap (the paper's H - s).
        d: delay in control steps: the first ``min(d, m)`` steps are pinned.
        n: length of the new chunk (executed steps, the paper's H).

    Returns:
        a batch-1 :class:`Prefix` with :func:`rtc_weights`, or None when nothing overlaps.
    """
    if committed is None or len(committed) == 0:
        return None
    actions = torch.as_tensor(committed, dtype=torch.float32)[:n]  # (m, A)
    m = actions.shape[0]
    return Prefix(actions[None], rtc_weights(n, min(int(d), m), m)[:m])


@dataclass
class Prefix:
    """What the next chunk is conditioned on, aligned to its executed steps.

    Args:
        actions: (B, m, A) unnormalized actions the current chunk will execute from the new
            chunk's step 0 on (``m`` = the overlap; at most the chunk length).
        weights: (m,) inpainting weight per step (:func:`rtc_weights`): 1 pins the step.
    """

    actions: torch.Tensor
    weights: torch.Tensor

    def __post_init__(self):
        if self.actions.dim() != 3 or self.weights.dim() != 1 or \
                self.weights.shape[0] != self.actions.shape[1]:
            raise ValueError(f'prefix actions must be (B, m, A) and weights (m,), got '
                             f'{tuple(self.actions.shape)} and {tuple(self.weights.shape)}')

    def inpainter(self, normalize, like: torch.Tensor, start: int) -> 'Inpainter':
        """Return the :class:`Inpainter` for a predicted horizon shaped like ``like``.

        Args:
            normalize: maps (B, m, A) actions to the policy's normalized space.
            like: (B, T_a, A) the chunk's initial noise (shape, device, dtype).
            start: index of the first executed step in the horizon (T_o - 1).
        """
        B, T_a, A = like.shape
        if self.actions.shape[0] != B or self.actions.shape[2] != A:
            raise ValueError(f'prefix actions {tuple(self.actions.shape)} do not fit a chunk '
                             f'of {B} x {T_a} x {A}')
        m = min(self.actions.shape[1], T_a - start)
        actions = self.actions[:, :m].to(like.device, torch.float32)
        target = torch.zeros_like(like)
        weights = torch.zeros(T_a, device=like.device, dtype=like.dtype)
        target[:, start:start + m] = normalize(actions).to(like.dtype)  # (B, m, A)
        weights[start:start + m] = self.weights[:m].to(like.device, like.dtype)
        return Inpainter(target, weights)


class Inpainter:
    """Moves the overlap of a sample towards the committed prefix after each reverse step.

    Args:
        target: (B, T_a, A) normalized committed actions (anything where the weight is 0).
        weights: (T_a,) weight per horizon step.
    """

    def __init__(self, target: torch.Tensor, weights: torch.Tensor):
        self.target = target
        self.weights = weights.view(1, -1, 1)  # (1, T_a, 1)
        self.eps: Optional[torch.Tensor] = None

    def start(self, noise: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """Remember the chunk's noise; return the initial sample with the prefix noised in.

        Args:
            noise: (B, T_a, A) the chunk's initial noise.
            alpha_bar: cumulative alpha of the first timestep.
        """
        self.eps = noise
        return self.apply(noise, alpha_bar)

    def apply(self, x: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """Return ``x`` (B, T_a, A) with the weighted prefix at noise level ``alpha_bar``."""
        known = self.target * math.sqrt(alpha_bar) + self.eps * math.sqrt(1.0 - alpha_bar)
        # lerp returns ``known`` itself where the weight is 1 (no rounding of x + (k - x)).
        return torch.lerp(x, known, self.weights.expand_as(x))
