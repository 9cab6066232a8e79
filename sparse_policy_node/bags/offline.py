"""Recompute a policy node's chunks offline from the observations it was given.

The policy node turns input messages into observation windows (:mod:`ros.obs_history`) and
each window into a chunk. Given the same messages, the node's parameters and the stamps of
the chunks it published, :func:`offline_chunks` rebuilds each window by the node's rule
and runs a fresh :class:`SparseEngine` over them in the node's order (the rollout cache
carries from chunk to chunk as in the node). With ``noise_seed >= 0`` the noise is the same
(:mod:`core.seeded_noise`), so the chunks must agree up to float rounding.

Window rule (as the node): step ``i`` of ``T_o`` takes, per input, the message nearest
``t_ref - (T_o - 1 - i) * dt`` within ``sync_tolerance_s``, where ``t_ref`` is the chunk
stamp; before an input's first message of the episode the first one repeats. An episode
ends where the node was reset (:data:`EPISODE` samples) or where a stamp jumps back by more
than ``time_jump_reset_s`` (the node resets itself there).
Assumption: when the inputs are not stamped alike, the nearest message is taken from all
messages, while the node only had those that had arrived; the bridge and most drivers
stamp one observation step alike, where both agree.
"""

from dataclasses import dataclass
from typing import Dict
from typing import List
from typing import Optional
from typing import Sequence
from typing import Tuple

import numpy as np
from sparse_policy_node.core import keys
from sparse_policy_node.core.model_card import read_card
from sparse_policy_node.core.seeded_noise import engine_chunk_noise
from sparse_policy_node.ros import conversions as conv
from sparse_policy_node.ros.safety import model_bounds
import torch


EPISODE = 'episode'  # a sample key marking a reset of the node (a new episode starts)


class ReplayError(ValueError):
    """The bag, the node's parameters or the chunks do not allow a comparison; says why."""


@dataclass
class NodeInputs:
    """Where the node's observation keys come from, and how they are turned into arrays."""

    image_topics: Dict[str, str]          # image key -> absolute topic
    sources: Dict[str, List]              # absolute topic -> lowdim sources on it
    image_size: Tuple[int, int]
    image_prep: Dict[str, Tuple[str, bool]]   # image key -> (resize mode, flip)

    @property
    def topics(self) -> List[str]:
        """Every input topic (absolute)."""
        return sorted(set(self.image_topics.values()) | set(self.sources))

    def convert(self, topic: str, msg) -> List[Tuple[str, np.ndarray]]:
        """Return ``[(key, value)]`` of one input message, as the node's intake converts it.

        Raises:
            conv.ConversionError: the node rejects this message too.
        """
        out = []
        for key, image_topic in self.image_topics.items():
            if image_topic == topic:
                mode, flip = self.image_prep.get(key, ('squash', False))
                out.append((key, conv.image_to_chw(msg, self.image_size, mode, flip)))
        for src in self.sources.get(topic, []):
            out.append((src.key, conv.extract_lowdim(src, msg)))
        return out


def absolute(topic: str) -> str:
    """Return the absolute topic name (``ee_pose`` -> ``/ee_pose``)."""
    return topic if topic.startswith('/') else '/' + topic


def node_inputs(config, settings, model_dir: str, namespace: str = '') -> NodeInputs:
    """Describe the node's inputs from its model config and :class:`NodeSettings`."""
    def resolve(topic):
        return topic if topic.startswith('/') else absolute(f'{namespace.strip("/")}/{topic}'
                                                            if namespace.strip('/') else topic)
    card = read_card(model_dir, config) or {}
    prep = {keys.image_key(cam): (spec.get('resize_mode', 'squash'),
                                  bool(spec.get('flip_vertical', False)))
            for cam, spec in card.get('cameras', {}).items()}
    images = {keys.image_key(cam): resolve(settings.image_topic_format.format(camera=cam))
              for cam in config.obs.vision.cameras}
    sources = {}
    for src in conv.parse_lowdim_map(settings.lowdim_map):
        sources.setdefault(resolve(src.topic), []).append(src)
    return NodeInputs(images, sources, tuple(config.obs.vision.image_size), prep)


def split_episodes(samples: Sequence[Tuple[str, int, np.ndarray]], jump_ns: int) -> List[Dict]:
    """Group ``(key, stamp, value)`` samples (arrival order) into the node's episodes.

    Per key, a stamp equal to the newest is a duplicate and one slightly older is out of
    order (both dropped, as the node does); one more than ``jump_ns`` older starts a new
    episode, and so does a sample whose key is :data:`EPISODE` (the node was reset).

    Returns:
        per episode ``{key: [(stamp, value), ...]}`` in increasing stamps.
    """
    episodes = [{}]
    for key, stamp, value in samples:
        if key == EPISODE:
            if episodes[-1]:
                episodes.append({})
            continue
        stream = episodes[-1].setdefault(key, [])
        if stream and stamp <= stream[-1][0]:
            if stamp >= stream[-1][0] - jump_ns:
                continue  # duplicate or out of order: dropped
            episodes.append({})
            stream = episodes[-1].setdefault(key, [])
        stream.append((stamp, value))
    return [e for e in episodes if e]


def window_at(episode: Dict[str, List], stamp_ns: int, n_steps: int, dt_ns: int,
              tolerance_ns: int) -> Tuple[Dict[str, np.ndarray], Dict[str, List[int]]]:
    """Rebuild the node's window stamped ``stamp_ns`` from one episode's streams.

    Returns:
        per key the (T_o, ...) array and the T_o stamps it was taken from.

    Raises:
        ReplayError: an input has no message within the tolerance of a step.
    """
    arrays, stamps = {}, {}
    for key, stream in episode.items():
        times = np.array([s for s, _ in stream], dtype=np.int64)
        picked = []
        for i in range(n_steps):
            target = stamp_ns - (n_steps - 1 - i) * dt_ns
            j = int(np.argmin(np.abs(times - target)))
            if abs(int(times[j]) - target) <= tolerance_ns:
                picked.append(stream[j])
            elif target < times[0]:
                picked.append(stream[0])  # episode start: the first message repeats
            else:
                raise ReplayError(f'no {key} message within {tolerance_ns / 1e6:.0f} ms of '
                                  f'{target / 1e9:.3f} s (window of the chunk at '
                                  f'{stamp_ns / 1e9:.3f} s)')
        arrays[key] = np.stack([v for _, v in picked])  # (T_o, ...)
        stamps[key] = [s for s, _ in picked]
    return arrays, stamps


def _episode_of(episode_stamps: List[set], start: int, stamp_ns: int) -> int:
    """Index of the first episode from ``start`` on with an observation at ``stamp_ns``.

    A chunk's stamp is always the stamp of one of its inputs' messages (the node stamps a
    window at the newest stamp every input has reached).
    """
    for e in range(start, len(episode_stamps)):
        if stamp_ns in episode_stamps[e]:
            return e
    raise ReplayError(f'no observation stamped {stamp_ns / 1e9:.3f} s in episode {start} or '
                      f'later of the replayed messages')


def offline_chunks(engine, inputs: NodeInputs, samples, stamps: Sequence[int], settings,
                   n_steps: int) -> List[np.ndarray]:
    """Recompute the chunks stamped ``stamps`` (in the node's order) with ``engine``.

    Args:
        engine: a fresh :class:`SparseEngine` with the node's model and runtime.
        inputs: the node's inputs (:func:`node_inputs`).
        samples: ``(key, stamp_ns, value)`` converted input messages in arrival order.
        stamps: stamps of the chunks the node published, in publication order.
        settings: the node's :class:`NodeSettings` (timing, seed, horizon, limits).
        n_steps: T_o of the model.

    Returns:
        per chunk the (n, A) float64 actions as the node publishes them (horizon, clamp).
    """
    dt_ns = int(round(1e9 / settings.control_rate_hz))
    episodes = split_episodes(samples, int(settings.time_jump_reset_s * 1e9))
    tolerance_ns = int(settings.sync_tolerance_s * 1e9)
    action_dim = engine.policy.config.transformer.action_dim
    card = read_card(engine.model_dir, engine.policy.config) if engine.model_dir else None
    lower, upper, _ = model_bounds(card, settings.action_lower, settings.action_upper,
                                   action_dim)  # the node's bounds (absolute: the card's)
    horizon = settings.execution_horizon or engine.policy.config.n_action_steps
    episode_stamps = [{t for stream in ep.values() for t, _ in stream} for ep in episodes]
    chunks, current = [], None
    engine.reset()
    for stamp in stamps:
        e = _episode_of(episode_stamps, current or 0, stamp)
        if current is not None and e != current:
            engine.reset()  # the node reset at the time jump: dense chunk, empty caches
        current = e
        arrays, window_stamps = window_at(episodes[e], stamp, n_steps, dt_ns, tolerance_ns)
        obs = {k: torch.from_numpy(v).unsqueeze(0).to(engine.device) for k, v in arrays.items()}
        frame_ids = {k: [(e, ns) for ns in window_stamps[k]] for k in inputs.image_topics}
        out = engine.predict_action(obs, frame_ids=frame_ids,
                                    **engine_chunk_noise(engine, settings.noise_seed, stamp))
        actions = out['action'][0, :horizon].double().cpu().numpy()
        chunks.append(conv.clamp_actions(actions, lower, upper))
    return chunks


def compare(live: Sequence[Tuple[int, np.ndarray]], reference: Dict[int, np.ndarray],
            tolerance: Optional[float] = None) -> List[Dict]:
    """Per live chunk, max |difference| against the reference chunk of the same stamp.

    Args:
        live: ``(stamp, (n, A) actions)`` chunks the node published.
        reference: chunks by stamp.
        tolerance: None compares whole chunks. Else a chunk that arrived late on a robot
            that does not wait keeps the previous chunk's values for the steps that ran
            before it arrived (``execution.mode``): the leading steps that differ by more
            than ``tolerance`` while the rest agrees are counted as ``kept_steps`` and left
            out of the difference.

    Returns:
        rows ``{'stamp_ns', 'max_abs_diff', 'kept_steps'}``; ``max_abs_diff`` is None when
        the reference has no chunk at that stamp, inf when the shapes differ.
    """
    rows = []
    for stamp, actions in live:
        ref, kept = reference.get(stamp), 0
        if ref is None:
            diff = None
        elif np.shape(ref) != np.shape(actions):
            diff = float('inf')
        else:
            step = np.abs(np.asarray(ref) - np.asarray(actions)).max(axis=1)  # (n,)
            bad = np.nonzero(step > tolerance)[0] if tolerance is not None else []
            if len(bad) and bad[-1] + 1 < len(step):
                kept = int(bad[-1]) + 1
            diff = float(step[kept:].max())
        rows.append({'stamp_ns': int(stamp), 'max_abs_diff': diff, 'kept_steps': kept})
    return rows
