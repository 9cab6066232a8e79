"""Image features of recent camera frames, so each frame is encoded once, not T_o times.

Consecutive observation windows share T_o - 1 frames, and the image encoder works frame by
frame (at inference the crop is the deterministic centre crop), so a frame's features never
change while the weights do not. The engine keeps them here, keyed by (image key, frame id).
A caller that encodes each frame as it arrives (``SparseEngine.encode_frame``) takes the whole
vision encoder off the observation-to-chunk critical path.

A frame id must identify the image content: the ROS node uses (episode, stamp). Ids are opaque
hashable values; the cache never looks inside them.

Two threads may want the same frame (the node's frame encoder, and a chunk that starts before
the encoder got to it). :meth:`FrameFeatureCache.claim` hands each frame to exactly one of
them; the other waits for it (:meth:`FrameFeatureCache.wait`) instead of encoding it twice.
The chunk encodes the frames nobody claimed yet, so two cameras' new frames are encoded on two
cores at once.
"""

from collections import OrderedDict
import threading
from typing import Dict
from typing import Hashable
from typing import Optional

import torch


class FrameFeatureCache:
    """Bounded, thread-safe LRU map (image key, frame id) -> (F,) feature vector."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f'FrameFeatureCache capacity must be >= 1, got {capacity}')
        self.capacity = capacity
        self._entries: 'OrderedDict[tuple, torch.Tensor]' = OrderedDict()
        self._pending: Dict[tuple, threading.Event] = {}
        self._lock = threading.Lock()

    def get(self, image_key: str, frame_id: Hashable) -> Optional[torch.Tensor]:
        """Return the cached (F,) features of a frame, or None."""
        with self._lock:
            value = self._entries.get((image_key, frame_id))
            if value is not None:
                self._entries.move_to_end((image_key, frame_id))
            return value

    def claim(self, image_key: str, frame_id: Hashable) -> bool:
        """Return True when the caller must encode this frame (nobody has it or is on it).

        A claim ends with :meth:`put` or, if encoding failed, :meth:`abandon`.
        """
        key = (image_key, frame_id)
        with self._lock:
            if key in self._entries or key in self._pending:
                return False
            self._pending[key] = threading.Event()
            return True

    def wait(self, image_key: str, frame_id: Hashable,
             timeout_s: float) -> Optional[torch.Tensor]:
        """Return the frame's features, waiting up to ``timeout_s`` for a claimed one.

        None when the frame is neither cached nor claimed, the claim was abandoned, or the
        wait timed out; the caller then encodes it itself.
        """
        key = (image_key, frame_id)
        with self._lock:
            event = self._pending.get(key)
        if event is not None:
            event.wait(timeout_s)
        return self.get(image_key, frame_id)

    def put(self, image_key: str, frame_id: Hashable, features: torch.Tensor) -> None:
        """Store (F,) features, evicting the least recently used entry when full."""
        key = (image_key, frame_id)
        with self._lock:
            self._entries[key] = features
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
            event = self._pending.pop(key, None)
        if event is not None:
            event.set()

    def abandon(self, image_key: str, frame_id: Hashable) -> None:
        """Release a claim without features (encoding failed); waiters stop waiting."""
        with self._lock:
            event = self._pending.pop((image_key, frame_id), None)
        if event is not None:
            event.set()

    def clear(self) -> None:
        """Forget every frame (new weights, or ids that may be reused); release waiters."""
        with self._lock:
            self._entries.clear()
            pending, self._pending = self._pending, {}
        for event in pending.values():
            event.set()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
