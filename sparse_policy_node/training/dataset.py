"""Demonstrations in the robomimic HDF5 layout, and a torch Dataset of training windows.

File layout (robomimic's, so public robomimic datasets load too)::

    data                      attrs: total (transitions), env_args (JSON string)
    data/demo_N               attrs: num_samples
    data/demo_N/actions       (L, A) float
    data/demo_N/obs/<key>     (L, ...) images as (L, H, W, 3) uint8 upright, low-dim (L, d)
    data/demo_N/rewards       (L,)    data/demo_N/dones (L,)

Windows are sampled like Diffusion Policy's ``SequenceSampler``: every start from
``-(T_o - 1)`` to ``L - T_a + n_action_steps - 1``, indices outside the episode clamped, which
repeats the first observation before the start and the last action after the end.
"""

import json
import re
from typing import Dict
from typing import List
from typing import Optional
from typing import Sequence

import h5py
import numpy as np
from sparse_policy_node.core import keys
from sparse_policy_node.core.config import PolicyConfig
from sparse_policy_node.core.normalizer import Normalizer
import torch
from torch.utils.data import Dataset


def _demo_sort_key(name: str) -> int:
    match = re.fullmatch(r'demo_(\d+)', name)
    return int(match.group(1)) if match else -1


def write_obs_array(group, key: str, value: np.ndarray, image: bool) -> None:
    """Store one observation array: images compressed, a chunk per frame; the rest float32."""
    if image:
        group.create_dataset(key, data=value, chunks=(1, *value.shape[1:]),
                             compression='gzip', compression_opts=4)
    else:
        group.create_dataset(key, data=value.astype(np.float32))


class DemoWriter:
    """Append episodes to a robomimic-layout HDF5 file (context manager)."""

    def __init__(self, path: str, env_args: Optional[dict] = None):
        self.file = h5py.File(path, 'w')
        self.data = self.file.create_group('data')
        self.data.attrs['env_args'] = json.dumps(env_args or {})
        self.count = 0
        self.total = 0

    def add(self, obs: Sequence[Dict[str, np.ndarray]], actions: np.ndarray,
            attrs: Optional[dict] = None) -> str:
        """Write one episode.

        Args:
            obs: L per-step observations in policy layout (images (3, H, W) uint8).
            actions: (L, A) actions.
            attrs: extra attributes of the demo group (e.g. the reset seed).

        Returns:
            the group name, ``demo_N``.
        """
        L = len(actions)
        if len(obs) != L or L == 0:
            raise ValueError(f'episode needs as many observations as actions (> 0), '
                             f'got {len(obs)} and {L}')
        name = f'demo_{self.count}'
        group = self.data.create_group(name)
        group.attrs['num_samples'] = L
        for key, value in (attrs or {}).items():
            group.attrs[key] = value
        group.create_dataset('actions', data=np.asarray(actions, dtype=np.float32))
        rewards = np.zeros(L, dtype=np.float32)
        rewards[-1] = 1.0
        group.create_dataset('rewards', data=rewards)
        group.create_dataset('dones', data=(np.arange(L) == L - 1).astype(np.int64))
        obs_group = group.create_group('obs')
        for key in obs[0]:
            stacked = np.stack([o[key] for o in obs])
            image = key.endswith(keys.IMAGE_SUFFIX)
            if image:
                stacked = stacked.transpose(0, 2, 3, 1)  # robomimic stores (L, H, W, 3)
            write_obs_array(obs_group, key, stacked, image)
        self.count += 1
        self.total += L
        return name

    def close(self) -> None:
        """Write the totals and close the file."""
        if self.file:
            self.data.attrs['total'] = self.total
            self.file.close()
            self.file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def demo_names(path: str) -> List[str]:
    """Names of the demo groups of ``path`` in numeric order."""
    with h5py.File(path, 'r') as f:
        return sorted(f['data'].keys(), key=_demo_sort_key)


def read_env_args(path: str) -> dict:
    """Return the ``env_args`` JSON of a dataset (empty dict when absent)."""
    with h5py.File(path, 'r') as f:
        return json.loads(f['data'].attrs.get('env_args', '{}'))


def load_episodes(path: str, obs_keys: Sequence[str], max_demos: Optional[int] = None
                  ) -> List[Dict[str, np.ndarray]]:
    """Read episodes into memory in policy layout.

    Args:
        path: robomimic-layout HDF5 file.
        obs_keys: observation keys to read; image keys are converted to (L, 3, H, W) uint8.
        max_demos: read only the first ``max_demos`` demos.

    Returns:
        one dict per episode with ``'action'`` (L, A) float32 and every key of ``obs_keys``.
    """
    episodes = []
    with h5py.File(path, 'r') as f:
        names = sorted(f['data'].keys(), key=_demo_sort_key)[:max_demos]
        for name in names:
            group = f['data'][name]
            episode = {keys.ACTION: group['actions'][()].astype(np.float32)}
            for key in obs_keys:
                if key not in group['obs']:
                    raise KeyError(f'{path}: {name}/obs has no key {key!r}; available: '
                                   f'{sorted(group["obs"].keys())}')
                value = group['obs'][key][()]
                if key.endswith(keys.IMAGE_SUFFIX):
                    value = np.ascontiguousarray(value.transpose(0, 3, 1, 2), dtype=np.uint8)
                else:
                    value = value.astype(np.float32)
                episode[key] = value
            episodes.append(episode)
    return episodes


class WindowDataset(Dataset):
    """(observation window, action chunk) samples for a :class:`PolicyConfig`.

    Each item is ``(obs, action)``: ``obs[key]`` is (T_o, ...) and ``action`` is (T_a, A).
    """

    def __init__(self, episodes: List[Dict[str, np.ndarray]], config: PolicyConfig):
        t = config.transformer
        self.episodes = episodes
        self.obs_keys = [keys.image_key(c) for c in config.obs.vision.cameras]
        self.obs_keys += [k for k, _ in config.obs.lowdim]
        self.n_obs_steps = t.n_obs_steps
        self.horizon = t.horizon
        pad_before = t.n_obs_steps - 1
        pad_after = config.n_action_steps - 1
        self.index = []
        for e, episode in enumerate(episodes):
            L = len(episode[keys.ACTION])
            last = L - self.horizon + pad_after
            self.index += [(e, s) for s in range(-pad_before, last + 1)]

    @classmethod
    def from_hdf5(cls, path: str, config: PolicyConfig, max_demos: Optional[int] = None):
        """Load the keys ``config`` needs from a robomimic-layout file."""
        obs_keys = [keys.image_key(c) for c in config.obs.vision.cameras]
        obs_keys += [k for k, _ in config.obs.lowdim]
        return cls(load_episodes(path, obs_keys, max_demos), config)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        e, start = self.index[i]
        episode = self.episodes[e]
        L = len(episode[keys.ACTION])
        obs_idx = np.clip(np.arange(start, start + self.n_obs_steps), 0, L - 1)
        act_idx = np.clip(np.arange(start, start + self.horizon), 0, L - 1)
        obs = {k: torch.from_numpy(episode[k][obs_idx]) for k in self.obs_keys}
        return obs, torch.from_numpy(episode[keys.ACTION][act_idx])


def normalizer_mode(key: str) -> str:
    """Diffusion Policy's choice: ``identity`` for quaternions, ``limits`` for the rest."""
    return 'identity' if key.endswith('quat') else 'limits'


def fit_normalizer(normalizer: Normalizer, episodes: List[Dict[str, np.ndarray]]) -> None:
    """Fit every key of ``normalizer`` on all frames of ``episodes``."""
    for key in normalizer.keys:
        data = np.concatenate([episode[key] for episode in episodes])
        normalizer.fit(key, data, normalizer_mode(key))
