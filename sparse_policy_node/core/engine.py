"""Stateful sparse inference engine: one per robot, keeps the rollout cache across chunks.

Per chunk (control step)::

    obs --encode--> cond --encoder + cross-attn K/V (all K steps, one pass)--> memory
    (time tokens depend only on the schedule: encoded once per schedule, not per chunk)
                                   |                          |
                                   +--> pruner (worker thread / side CUDA stream) --> gates
                                                              |                       |
                         step 0: dense decoder  <-------------+                       |
                         steps 1..K-1: gated decoder  <--- wait for gates once, at k=1 +

The pruner overlaps the mandatory dense step 0. On CPU it runs in a worker thread (torch ops
release the GIL); on CUDA it runs on a side stream that waits for the encoder's stream, and
its gate map is copied to pinned host memory without blocking; the host waits on one event
just before step 1, never inside the per-step loop.

On CUDA the loop itself never synchronises with the host either: the initial and DDPM
variance noise are drawn on the device before step 0 (from a device generator seeded from the
host generator, see :func:`sampler.device_generator`), gate tables live on the device, and the
statistics are read after the loop. ``test_core_sync.py`` checks it with a transfer spy on CPU
and with ``torch.cuda.set_sync_debug_mode('error')`` on a GPU. With ``RuntimeConfig.cuda_graphs``
(default) batch-1 chunks on CUDA run from captured graphs (:mod:`cuda_graphs`): one per dense
chunk, one per (step, pattern) of a sparse chunk; the cache restarts dense whenever the path
(eager, dense graph, step graphs, schedule or precision) changes.

``RuntimeConfig.backend`` picks who runs the pieces (:mod:`backends`): the modules themselves,
or exported graphs in ONNX Runtime / TensorRT behind drop-ins with the same per-unit API, so
the loop above is one code path for all; a backend is built by :meth:`set_runtime` (or at
construction), never inside a chunk.
"""

from concurrent.futures import ThreadPoolExecutor
import copy
import functools
import logging
import threading
import time
from typing import Dict
from typing import Hashable
from typing import Optional
from typing import Sequence

from sparse_policy_node.core import keys
from sparse_policy_node.core.backends import Backend
from sparse_policy_node.core.backends import check_backend
from sparse_policy_node.core.backends import forget
from sparse_policy_node.core.backends import make_backend
from sparse_policy_node.core.backends import resolve_backend
from sparse_policy_node.core.cache import FeatureCache
from sparse_policy_node.core.checkpoint import for_schedule
from sparse_policy_node.core.config import ConfigError
from sparse_policy_node.core.config import RuntimeConfig
from sparse_policy_node.core.flops import chunk_macs
from sparse_policy_node.core.frame_cache import FrameFeatureCache
from sparse_policy_node.core.gates import argmax_gates
from sparse_policy_node.core.gates import dense_gates
from sparse_policy_node.core.gates import dial_gates
from sparse_policy_node.core.gates import gate_counts
from sparse_policy_node.core.gates import random_gates
from sparse_policy_node.core.gates import static_gates
from sparse_policy_node.core.observation import observation_window
from sparse_policy_node.core.policy import ObservationError
from sparse_policy_node.core.rtc import Prefix
from sparse_policy_node.core.sampler import chunk_noise
from sparse_policy_node.core.sampler import device_generator
from sparse_policy_node.core.sampler import initial_noise
from sparse_policy_node.core.scheduler import NoiseScheduler
from sparse_policy_node.core.sparse_sampler import RolloutAgeStats
from sparse_policy_node.core.sparse_sampler import sample_soft
from sparse_policy_node.core.sparse_sampler import sample_sparse
import torch
import torch.nn.functional as F


class NonFiniteActionError(RuntimeError):
    """The sampled chunk contains NaN or inf; the caches were cleared, nothing is returned."""


class SparseEngine:
    """Sparse diffusion-policy inference with caches that live across control steps."""

    def __init__(self, policy, pruner=None, runtime: Optional[RuntimeConfig] = None,
                 model_dir: Optional[str] = None):
        """Build an engine with empty caches.

        Args:
            policy: the :class:`DiffusionPolicy` (frozen, eval mode).
            pruner: None, one :class:`Pruner`, or ``{(sampler, K): Pruner}`` with one pruner
                per schedule it was trained for (:func:`checkpoint.load_pruners`). A pruner
                whose ``schedule`` is None is used on any schedule without a check.
            runtime: knobs; default: learned gates on the first pruner's schedule, or dense on
                the model's schedule without a pruner.
            model_dir: the directory the policy came from, if any: exported graphs of the
                onnxruntime / tensorrt backends are cached next to it (see :mod:`backends`).
        """
        self.policy = policy.eval()
        if pruner is None:
            pruner = {}
        elif not isinstance(pruner, dict):
            pruner = {pruner.schedule: pruner}
        self.pruners = {s: p.eval() for s, p in pruner.items()}
        self.device = next(policy.parameters()).device
        if runtime is None:
            sched = policy.config.scheduler
            trained = [s for s in self.pruners if s is not None]
            sampler, steps = trained[0] if trained else (sched.sampler,
                                                         sched.num_inference_steps)
            runtime = RuntimeConfig(sparsity_enabled=bool(self.pruners), sampler=sampler,
                                    num_inference_steps=steps)
        self.check_runtime(runtime)
        self._runtime = runtime
        self._pending: Optional[RuntimeConfig] = None
        self._reset_requested = False
        self._lock = threading.Lock()
        self.scheduler = NoiseScheduler(policy.config.scheduler)
        self.cache = FeatureCache(policy.transformer.num_units)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix='pruner')
        self._side_stream = None
        self.random_generator = torch.Generator().manual_seed(0)
        self._device_generator = None  # draws a CUDA chunk's noise (see device_generator)
        self._models = {'float32': policy.transformer}  # denoiser per RuntimeConfig.precision
        self._fixed_gates = {}  # host rows of dense / static gate maps, per schedule and knobs
        self._graphs = {}  # DenseChunkGraph / StepGraphs per graph mode (cuda_graphs)
        self._cache_mode = None  # the path whose buffers the cache slots point into
        # Graph form of sparse batch-1 chunks (benchmarks pick one): 'whole' (one graph per
        # chunk with conditional nodes, :mod:`chunk_graph`; on the CPU its body runs eagerly),
        # 'step' (per-step pattern graphs, CUDA), 'none' (eager); None: 'whole' on CUDA where
        # conditional nodes exist, else 'step', eager on the CPU.
        self.graph_form: Optional[str] = None
        self._graph_fallback = None  # why the whole-chunk graph is not used (logged once)
        self.transformer_for(runtime.precision)
        self.model_dir = model_dir
        self._backends = {}  # Backend per (RuntimeConfig.backend, precision)
        self._time_cache = None
        self.last_gates = None
        self.backend_for(runtime)
        if self.device.type == 'cpu':
            # Frames are encoded one at a time (encode_frame, streaming windows). At batch 1
            # oneDNN's channels-last convolutions are about 2x faster than NCHW ones on CPU
            # (22 -> 11 ms per ResNet-18 frame here); results agree to float rounding.
            policy.obs_encoder.to(memory_format=torch.channels_last)
        vision = policy.config.obs.vision
        self.frames = FrameFeatureCache(
            max(1, len(vision.cameras)) * 4 * policy.config.transformer.n_obs_steps)

    # ==== runtime knobs ====

    @property
    def runtime(self) -> RuntimeConfig:
        """The knobs in force for the next chunk (pending changes included)."""
        with self._lock:
            return self._pending or self._runtime

    def pruner_for(self, sampler: str, steps: int):
        """Return the pruner trained for (sampler, K), else an unchecked one, else None."""
        return for_schedule(self.pruners, (sampler, int(steps)))

    @property
    def pruner(self):
        """The pruner of the schedule in force (None: no pruner for it)."""
        runtime = self.runtime
        return self.pruner_for(runtime.sampler, runtime.num_inference_steps)

    def check_runtime(self, cfg: RuntimeConfig) -> None:
        """Raise ConfigError when ``cfg`` cannot run with this model (no side effects).

        Learned gates need a pruner trained for the requested schedule (sampler, K): gates
        learned for DDPM-100 mean nothing at DDIM-10's timesteps, so that is refused, not run.
        """
        check_backend(cfg.backend, self.device)
        if resolve_backend(cfg.backend, self.device, cfg.precision) == 'onnxruntime' and \
                cfg.precision != 'float32':
            raise ConfigError(f'RuntimeConfig.precision={cfg.precision} needs backend torch or '
                              f'tensorrt; the onnxruntime graphs are float32')
        n_train = self.policy.config.scheduler.num_train_timesteps
        if cfg.num_inference_steps > n_train:
            raise ConfigError(f'RuntimeConfig.num_inference_steps={cfg.num_inference_steps} '
                              f'exceeds num_train_timesteps={n_train} of the model')
        if cfg.sparsity_enabled and cfg.gate_source == 'pruner':
            if not self.pruners:
                raise ConfigError('RuntimeConfig.gate_source=pruner but this model has no '
                                  'pruner; use static, random or dense, or train a pruner')
            if self.pruner_for(cfg.sampler, cfg.num_inference_steps) is None:
                have = ', '.join(f'{s}-{k}' for s, k in sorted(self.pruners))
                raise ConfigError(
                    f'no pruner trained for {cfg.sampler}-{cfg.num_inference_steps} (this model '
                    f'has pruners for: {have}); switch the schedule to one of those, turn '
                    f'sparsity off, or train a pruner on rollouts of that schedule')

    def set_runtime(self, cfg: RuntimeConfig) -> None:
        """Validate ``cfg`` and apply it from the next chunk (safe while a chunk runs).

        ``cfg`` replaces every knob: to change some and keep the model's serving default
        for the rest, pass ``engine.runtime.replace(...)``.
        """
        self.check_runtime(cfg)
        self.transformer_for(cfg.precision)  # a reduced-precision copy is made here, not later
        self.backend_for(cfg)  # graphs are exported and loaded here, never inside a chunk
        with self._lock:
            self._pending = cfg

    def reset(self) -> None:
        """Start a new episode: the next chunk clears every cache and runs dense.

        Frame features are dropped at once (frame ids such as stamps may repeat after a
        simulator reset); the feature caches are cleared by the next chunk.
        """
        with self._lock:
            self._reset_requested = True
        self.frames.clear()

    def _apply_pending(self) -> RuntimeConfig:
        with self._lock:
            if self._pending is not None:
                self._runtime, self._pending = self._pending, None
            if self._reset_requested:
                self.cache.reset()
                self._reset_requested = False
            runtime = self._runtime
        if (self.scheduler.sampler, self.scheduler.num_steps) != (
                runtime.sampler, runtime.num_inference_steps):
            self.scheduler.set_timesteps(runtime.num_inference_steps, runtime.sampler)
        return runtime

    def transformer_for(self, precision: str):
        """Return the denoiser in ``precision``: the policy's own for float32, else a copy."""
        if precision not in self._models:
            dtype = getattr(torch, precision)
            self._models[precision] = copy.deepcopy(self.policy.transformer).to(dtype).eval()
        return self._models[precision]

    def needs_build(self, runtime: RuntimeConfig) -> bool:
        """Return True when serving ``runtime`` first takes seconds: graphs to export, load.

        The torch backend is built in milliseconds (at most a reduced-precision copy); the
        graph backends (onnxruntime, tensorrt) are exported and loaded on first use.
        """
        name = resolve_backend(runtime.backend, self.device, runtime.precision)
        return name != 'torch' and (name, runtime.precision) not in self._backends

    def backend_for(self, runtime: RuntimeConfig) -> Backend:
        """Return the pieces that run ``runtime`` (:mod:`backends`); built on first use."""
        name = resolve_backend(runtime.backend, self.device, runtime.precision)
        key = (name, runtime.precision)
        if key not in self._backends:
            if name == 'torch':
                backend = Backend('torch', self.transformer_for(runtime.precision),
                                  self.policy.obs_encoder, self.pruners)
            else:
                backend = make_backend(name, self.policy, self.pruners, self.device,
                                       self.model_dir, runtime.precision)
            self._backends[key] = backend
        return self._backends[key]

    # ==== gates ====

    def _gate_map(self, runtime: RuntimeConfig, time_mem, obs_mem) -> torch.Tensor:
        """(B, K, U) integer gate maps for one chunk (before the first-chunk dense rule)."""
        B = obs_mem.shape[0]
        K, U = self.scheduler.num_steps, self.policy.transformer.num_units
        s = runtime.target_sparsity
        if not runtime.sparsity_enabled or runtime.gate_source == 'dense':
            return dense_gates(K, U).expand(B, K, U)
        if runtime.gate_source == 'static':
            return static_gates(K, U, s).expand(B, K, U)
        if runtime.gate_source == 'random':
            return torch.stack([random_gates(K, U, s, runtime.directions,
                                             self.random_generator) for _ in range(B)])
        pruner = for_schedule(self.backend_for(runtime).pruners,
                              (runtime.sampler, runtime.num_inference_steps))
        logits = pruner(time_mem.float(), obs_mem.float())  # (B, K, U, 4); float32 as trained
        if s >= 0:
            return torch.stack([dial_gates(z, s, runtime.directions) for z in logits])
        return argmax_gates(logits, runtime.directions)

    def _launch_gates(self, runtime: RuntimeConfig, time_mem, obs_mem):
        """Start gate prediction concurrently with step 0; return a callable that waits."""
        timing = {}

        def compute():
            t0 = time.perf_counter()
            with torch.no_grad():  # grad mode is thread-local
                gates = self._gate_map(runtime, time_mem, obs_mem)
            timing['pruner_ms'] = (time.perf_counter() - t0) * 1e3
            return gates

        if runtime.gate_source != 'pruner' or not runtime.sparsity_enabled:
            if runtime.sparsity_enabled and runtime.gate_source == 'random':
                gates = compute()
                return lambda: gates[0].tolist(), timing
            # Dense and static maps depend on the schedule and knobs only: built once.
            key = (runtime.sparsity_enabled, runtime.gate_source, runtime.target_sparsity,
                   self.scheduler.num_steps, self.policy.transformer.num_units)
            if key not in self._fixed_gates:
                self._fixed_gates[key] = compute()[0].tolist()
            rows = self._fixed_gates[key]
            return lambda: rows, timing
        if self.device.type == 'cuda':
            main = torch.cuda.current_stream(self.device)
            if self._side_stream is None:
                self._side_stream = torch.cuda.Stream(self.device)
            side = self._side_stream
            side.wait_stream(main)  # the encoder output must be complete before the pruner
            with torch.cuda.stream(side):
                time_mem.record_stream(side)
                obs_mem.record_stream(side)
                gates = compute()
                host = torch.empty(gates.shape[1:], dtype=gates.dtype, pin_memory=True)
                host.copy_(gates[0], non_blocking=True)
                done = torch.cuda.Event()
                done.record(side)

            def wait_cuda():
                done.synchronize()
                return host.tolist()
            return wait_cuda, timing
        future = self._worker.submit(compute)
        return lambda: future.result()[0].tolist(), timing

    # ==== inference ====

    def _time_tokens(self, model=None):
        """Memory time tokens and their cross-attention K/V for the current schedule.

        They depend only on the timesteps, never on the observation, so they are computed
        once per schedule (and denoiser precision) and reused by every chunk (weights are
        frozen at inference; call :meth:`refresh` after changing them).
        """
        model = model or self.policy.transformer
        key = (self.scheduler.sampler, tuple(self.scheduler.timesteps.tolist()), id(model))
        if self._time_cache is None or self._time_cache[0] != key:
            steps = self.scheduler.timesteps.to(self.device)
            # The memory encoder runs in float32 at any precision (it runs once per chunk and
            # the pruner reads its output); only the decoder's keys/values are cast.
            time_mem = self.policy.transformer.encode_time_tokens(steps)  # (K, D)
            self._time_cache = (key, time_mem,
                                model.time_kv(time_mem.to(model.pos_emb.dtype)))
        return self._time_cache[1], self._time_cache[2]

    # ==== frame features ====

    @torch.no_grad()
    def observation(self, steps) -> Dict[str, torch.Tensor]:
        """Batch-1 window ``{key: (1, T_o, ...)}`` from per-step arrays (oldest first).

        See :func:`sparse_policy_node.core.observation.observation_window`.
        """
        return observation_window(self.policy, steps)

    def encode_frame(self, image_key: str, frame_id: Hashable, image: torch.Tensor) -> None:
        """Encode one camera frame ahead of the chunk that will use it (any thread).

        Call it when the frame arrives; a later :meth:`predict_action` whose ``frame_ids``
        name this frame then skips its vision encoder.

        Args:
            image_key: ``'<camera>_image'`` of a model camera.
            frame_id: hashable id of this image's content (e.g. (episode, stamp)).
            image: (3, H, W) uint8 (or float in [0, 255]) image at the model's size.

        Raises:
            ObservationError: unknown camera, wrong shape or non-finite values.
        """
        shapes = self.policy.expected_obs_shapes()
        if image_key not in shapes or not image_key.endswith('_image'):
            cams = [k for k in shapes if k.endswith('_image')]
            raise ObservationError(f'{image_key!r} is not a camera of this model; cameras: '
                                   f'{cams}')
        if tuple(image.shape) != shapes[image_key][1:]:
            raise ObservationError(f'frame {image_key!r} has shape {tuple(image.shape)}, '
                                   f'expected {shapes[image_key][1:]}')
        if image.is_floating_point() and not torch.isfinite(image).all():
            raise ObservationError(f'frame {image_key!r} contains NaN or inf')
        if not self.frames.claim(image_key, frame_id):
            return  # cached already, or another thread is encoding it
        try:
            features = self.backend_for(self.runtime).cameras.encode_camera(
                image_key[:-len('_image')], image[None].to(self.device))
        except BaseException:
            self.frames.abandon(image_key, frame_id)
            raise
        self.frames.put(image_key, frame_id, features[0])

    def _camera_features(self, obs: Dict[str, torch.Tensor],
                         frame_ids: Dict[str, Sequence[Hashable]]):
        """Per image key (1, T_o, F) features from the frame cache.

        Frames nobody has claimed are encoded here (one batch per camera) while frames that
        another thread is encoding are waited for, so the two run on two cores.

        Returns:
            (features by image key, number of frames encoded here).
        """
        T_o = self.policy.config.transformer.n_obs_steps
        for key, ids in frame_ids.items():
            if key not in obs or not key.endswith('_image'):
                raise ObservationError(f'frame_ids names {key!r}, which is not an image key '
                                       f'of the observation')
            if len(ids) != T_o:
                raise ObservationError(f'frame_ids[{key!r}] has {len(ids)} ids, expected '
                                       f'T_o={T_o}')
        found = {key: [self.frames.get(key, i) for i in ids] for key, ids in frame_ids.items()}
        mine = {}
        for key, ids in frame_ids.items():
            steps = {}  # frame id -> first window step holding it (a repeat is encoded once)
            for t, i in enumerate(ids):
                if found[key][t] is None and i not in steps and self.frames.claim(key, i):
                    steps[i] = t
            mine[key] = self._encode_claimed(obs, key, steps)
        encoded = sum(len(m) for m in mine.values())
        out = {}
        for key, ids in frame_ids.items():
            feats = []
            for t, i in enumerate(ids):
                f = found[key][t] if found[key][t] is not None else mine[key].get(i)
                if f is None:
                    f = self.frames.wait(key, i, timeout_s=1.0)
                if f is None:  # the other thread failed, timed out or was reset
                    f = self._encode_claimed(obs, key, {i: t}, claimed=False)[i]
                    encoded += 1
                feats.append(f)
            out[key] = torch.stack(feats)[None]  # (1, T_o, F)
        return out, encoded

    def _encode_claimed(self, obs, key: str, steps: Dict[Hashable, int],
                        claimed: bool = True) -> Dict[Hashable, torch.Tensor]:
        """Encode frames ``{frame id: window step}`` of one camera in one batch; cache them.

        Returns:
            (F,) features by frame id.
        """
        if not steps:
            return {}
        try:
            new = self.backend_for(self.runtime).cameras.encode_camera(
                key[:-len('_image')], obs[key][0, list(steps.values())])  # (M, F)
        except BaseException:
            if claimed:
                for i in steps:
                    self.frames.abandon(key, i)
            raise
        for i, f in zip(steps, new):
            self.frames.put(key, i, f)
        return dict(zip(steps, new))

    def refresh(self) -> None:
        """Drop everything derived from the weights (after loading new weights in place)."""
        self._time_cache = None
        self._graphs.clear()
        self._models = {'float32': self.policy.transformer}
        self._backends.clear()
        forget(self.policy)
        self.transformer_for(self.runtime.precision)
        self.backend_for(self.runtime)
        self.reset()

    @torch.no_grad()
    def predict_action(self, obs: Dict[str, torch.Tensor], noise: Optional[torch.Tensor] = None,
                       generator: Optional[torch.Generator] = None,
                       step_noise: Optional[torch.Tensor] = None,
                       gates: Optional[torch.Tensor] = None,
                       frame_ids: Optional[Dict[str, Sequence[Hashable]]] = None,
                       prefix: Optional[Prefix] = None) -> Dict:
        """Sample one action chunk, reusing cached features where the gates say so.

        Args:
            obs: observation window, each key (B, T_o, ...) (see
                ``DiffusionPolicy.expected_obs_shapes``). B = 1 truly skips units; B > 1
                runs the batched soft-gated path (same outputs, no speedup).
            noise: optional (B, T_a, A) initial noise.
            generator: random generator for noise not given explicitly.
            step_noise: optional (K, B, T_a, A) DDPM variance noise.
            gates: optional precomputed (K, U) gate map for batch 1, used instead of the
                runtime's gate source (benchmarks compare against it).
            frame_ids: optional, batch 1 only: per image key, T_o ids of the window's frames
                (see :meth:`encode_frame`). Frames already encoded are taken from the frame
                cache; the others are encoded now and cached for the next windows.
            prefix: optional real-time chunking condition (:mod:`rtc`): the committed
                actions from the chunk's first executed step on and their weights; they are
                inpainted at every denoising step (gates and caches unchanged).

        Returns:
            ``action`` (B, n_action_steps, A), ``action_pred`` (B, T_a, A) and ``stats``
            (realized sparsity, choice counts, whether the chunk was forced dense, latency,
            time in the vision encoder and frames it encoded, pruner time, MACs).

        Raises:
            ObservationError: missing keys, wrong shapes or non-finite observations.
            NonFiniteActionError: the chunk is not finite (the caches are cleared).
        """
        t_start = time.perf_counter()
        policy = self.policy
        B = policy.check_obs(obs)
        if frame_ids and B != 1:
            raise ObservationError(f'frame_ids need a batch of 1, got {B}')
        runtime = self._apply_pending()
        t_enc = time.perf_counter()
        camera_features, encoded = {}, 0
        if frame_ids:
            camera_features, encoded = self._camera_features(obs, frame_ids)
        uncached = len(policy.config.obs.vision.cameras) - len(camera_features)
        encoded += B * policy.config.transformer.n_obs_steps * uncached
        backend = self.backend_for(runtime)
        if backend.name != 'torch':  # the other cameras through the backend's vision graphs
            for cam in policy.config.obs.vision.cameras:
                key = keys.image_key(cam)
                if key not in camera_features:
                    img = obs[key]  # (B, T_o, 3, H, W)
                    camera_features[key] = backend.cameras.encode_camera(
                        cam, img.flatten(0, 1)).unflatten(0, img.shape[:2])  # (B, T_o, F)
        cond = policy.encode_obs(obs, camera_features)
        encode_ms = (time.perf_counter() - t_enc) * 1e3
        model, sched = backend.transformer, self.scheduler
        if self.device.type != 'cpu' and (noise is None or (
                step_noise is None and sched.needs_step_noise())):
            # Draw the whole chunk's noise on the device now: the loop must not wait on host
            # copies. CPU keeps its per-step host draws (bit-identical to earlier releases).
            gen = device_generator(self.device, generator, self._device_generator)
            if gen is not generator:
                self._device_generator = gen  # our scratch generator, reseeded per chunk
            drawn, drawn_steps = chunk_noise(policy.action_shape(B), sched.num_steps,
                                             sched.needs_step_noise(), gen)
            noise = drawn if noise is None else noise
            step_noise = drawn_steps if step_noise is None else step_noise
        if noise is None:
            noise = initial_noise(policy.action_shape(B), generator, cond.device, cond.dtype)
        inpaint = None
        if prefix is not None:
            normalize = functools.partial(policy.normalizer.normalize, keys.ACTION)
            inpaint = prefix.inpainter(normalize, noise,
                                       policy.config.transformer.n_obs_steps - 1)
            noise = inpaint.start(noise, sched.alpha_bar_start)
        time_mem, time_kv = self._time_tokens(model)
        obs_mem = policy.transformer.encode_obs_tokens(cond)  # (B, T_o, D) float32
        dec_mem = obs_mem.to(model.pos_emb.dtype)  # the decoder's dtype (no-op in float32)

        def memory_kv():
            return model.assemble_kv(time_kv, model.obs_kv(dec_mem))  # per layer (B,K,nh,T_c,dh)
        mode = self._graph_mode(runtime, B, model, time_kv, gates is not None)
        if inpaint is not None:
            mode = ('eager', runtime.precision)  # graphs capture no prefix
        if mode != self._cache_mode:
            # Slots written by another path (eager references, a dense graph's pool, another
            # schedule's buffers) are not this path's: start over with a dense chunk.
            if self._cache_mode is not None:
                self.cache.reset()
            self._cache_mode = mode
        schedule = (sched.sampler, B, *sched.timesteps.tolist())
        forced_dense = self.cache.begin_chunk(schedule, sched.num_steps,
                                              runtime.rollout_max_age)
        K, U = sched.num_steps, model.num_units
        timing = {}
        ages = RolloutAgeStats()
        sched.inpaint = inpaint  # the one place every loop passes: NoiseScheduler.step
        try:
            if B == 1:
                gates_fn = None
                if not forced_dense and gates is not None:
                    gates_fn = gates.tolist
                elif not forced_dense and mode[0] != 'chunk':  # the chunk graph gates itself
                    gates_fn, timing = self._launch_gates(runtime, time_mem, obs_mem)
                t_dec = time.perf_counter()
                if mode[0] == 'chunk':
                    nactions, executed = self._run_chunk_graph(
                        mode, runtime, model, time_mem, time_kv, obs_mem, noise, step_noise,
                        forced_dense, gates, ages)
                elif mode[0] == 'dense' and gates is None:
                    graph = self._graph(mode, model, time_kv, dec_mem, noise, step_noise)
                    nactions = graph.replay(dec_mem, noise, step_noise, self.cache)
                    executed = [[0] * U for _ in range(K)]
                elif mode[0] == 'steps':
                    kv_all = memory_kv()
                    graph = self._graph(mode, model, kv_all, None, noise, step_noise)
                    nactions, executed = graph.run(kv_all, noise, step_noise, gates_fn,
                                                   self.cache, ages)
                else:
                    nactions, executed = sample_sparse(model, sched, memory_kv(), noise,
                                                       gates_fn, self.cache, step_noise,
                                                       generator, ages)
                timing['decoder_ms'] = (time.perf_counter() - t_dec) * 1e3
                executed = torch.as_tensor(executed).cpu()  # (K, U)
            else:
                # Batched evaluation: soft path with one-hot gates, per-sample caches.
                if forced_dense:
                    gate_maps = dense_gates(K, U).to(cond.device).expand(B, K, U)
                else:
                    t0 = time.perf_counter()
                    gate_maps = self._gate_map(runtime, time_mem, obs_mem).to(cond.device)
                    timing['pruner_ms'] = (time.perf_counter() - t0) * 1e3
                onehot = F.one_hot(gate_maps, 4).to(model.pos_emb.dtype)  # (B, K, U, 4)
                nactions, compute = sample_soft(model, sched, memory_kv(), noise, onehot,
                                                self.cache, step_noise, generator,
                                                return_compute=True)
                # What ran: an expired or empty slot computed whatever the gate chose.
                executed = torch.where(compute > 0.5, torch.zeros_like(gate_maps),
                                       gate_maps).cpu()  # (B, K, U)
        finally:
            sched.inpaint = None
        action_pred = policy.normalizer.unnormalize(keys.ACTION, nactions)
        if not bool(torch.isfinite(action_pred).all()):
            # Cached features may hold the bad values: never reuse them.
            self.cache.reset()
            raise NonFiniteActionError('the sampled action chunk contains NaN or inf (bad '
                                       'weights or inputs); caches were cleared')
        self.last_gates = executed
        stats = gate_counts(executed)
        pruner_ran = (not forced_dense and gates is None and runtime.sparsity_enabled
                      and runtime.gate_source == 'pruner')
        per_sample = executed.reshape(-1, K, U)
        kinds = [int((per_sample[..., j::3] == 0).sum()) // per_sample.shape[0]
                 for j in range(3)]
        pruner = self.pruner_for(runtime.sampler, runtime.num_inference_steps)
        macs = chunk_macs(policy.config.transformer, policy.config.obs.obs_feature_dim,
                          sched.num_steps, kinds, pruner.config if pruner_ran else None)
        stats.update(dense=forced_dense, backend=backend.name, num_steps=sched.num_steps,
                     sampler=sched.sampler,
                     latency_ms=(time.perf_counter() - t_start) * 1e3,
                     encode_ms=encode_ms, frames_encoded=encoded,
                     pruner_ms=timing.get('pruner_ms', 0.0),
                     decoder_ms=timing.get('decoder_ms', 0.0),
                     gmacs=macs['total'] / 1e9, gmacs_pruner=macs['pruner'] / 1e9,
                     chunk_index=self.cache.chunk, rollout_max_age=runtime.rollout_max_age,
                     **ages.as_dict())
        return {'action_pred': action_pred,
                'action': policy.chunk_from_prediction(action_pred),
                'stats': stats}

    def _graph_mode(self, runtime: RuntimeConfig, batch: int, model, time_kv,
                    explicit_gates: bool = False) -> tuple:
        """Which path runs the chunk: ('eager', dtype) or ('dense' | 'chunk' | 'steps', key).

        CUDA graphs (:mod:`cuda_graphs`, :mod:`chunk_graph`) serve batch-1 chunks of the torch
        denoiser on CUDA when ``runtime.cuda_graphs`` is on: one whole-chunk graph for dense
        runtimes; for sparse ones one whole-chunk graph with conditional nodes (``'chunk'``,
        keyed by schedule and gate source) where torch and CUDA have them, else per-step
        pattern graphs (see :attr:`graph_form`). Other backends' pieces (exported graphs,
        TensorRT engines) run eagerly.
        """
        dense = not runtime.sparsity_enabled or runtime.gate_source == 'dense'
        form = self.graph_form
        cpu_whole = self.device.type == 'cpu' and form == 'whole' and not dense
        if (not cpu_whole and (not runtime.cuda_graphs or self.device.type != 'cuda'
                               or form == 'none') or batch != 1
                or not isinstance(model, torch.nn.Module)):
            return ('eager', runtime.precision)  # cached branch outputs are in this dtype
        sched = self.scheduler
        key = (sched.sampler, tuple(sched.timesteps.tolist()), runtime.precision,
               id(time_kv[0][0]))
        if dense:
            return ('dense', key)
        if form != 'step' and self._whole_chunk_available():
            # one graph per (schedule, gate source, batch size): learned gates are computed
            # inside it; other sources feed their map in
            learned = runtime.gate_source == 'pruner' and not explicit_gates
            source = ('pruner', runtime.target_sparsity, runtime.directions) if learned \
                else ('input',)
            return ('chunk', key + source)
        return ('steps', key)

    def path_name(self) -> str:
        """Which path ran the last chunk: eager, dense_graph, whole_chunk_graph, step_graphs."""
        names = {'eager': 'eager', 'dense': 'dense_graph', 'chunk': 'whole_chunk_graph',
                 'steps': 'step_graphs'}
        return names.get((self._cache_mode or ('eager',))[0], 'eager')

    def _learned_gates(self, runtime: RuntimeConfig, time_mem, obs_mem) -> torch.Tensor:
        """(K, U) gate map of one batch-1 chunk (the whole-chunk graph's gate function)."""
        return self._gate_map(runtime, time_mem, obs_mem)[0]

    def _whole_chunk_available(self) -> bool:
        """Whether sparse chunks may run as one graph (logs once why not, on CUDA)."""
        from sparse_policy_node.core.chunk_graph import conditional_nodes
        if self.device.type == 'cpu':
            return self.graph_form == 'whole'
        if self._graph_fallback is None:
            ok, why = conditional_nodes(self.device)
            self._graph_fallback = '' if ok else why
            if not ok:
                logging.getLogger(__name__).warning(
                    'sparse chunks run on step graphs, not one whole-chunk graph: %s', why)
        return not self._graph_fallback

    def _run_chunk_graph(self, mode, runtime, model, time_mem, time_kv, obs_mem, noise,
                         step_noise, forced_dense, gates, ages):
        """One batch-1 chunk on the whole-chunk graph; falls back to step graphs on failure.

        Returns:
            (1, T_a, A) normalized actions and the (K, U) executed choices.
        """
        from sparse_policy_node.core.chunk_graph import SparseChunkGraph
        if mode not in self._graphs:
            gate_fn = None
            if mode[1][-1] != 'input':  # learned gates: the pruner runs inside the graph
                gate_fn = functools.partial(self._learned_gates, runtime, time_mem)
            try:
                graph = SparseChunkGraph(model, self.scheduler, time_kv, obs_mem, noise,
                                         step_noise, gate_fn)
            except Exception as exc:  # noqa: B902 (any capture failure: step graphs instead)
                self._graph_fallback = f'capture failed: {type(exc).__name__}: {exc}'
                logging.getLogger(__name__).warning(
                    'sparse chunks run on step graphs, not one whole-chunk graph: %s',
                    self._graph_fallback)
                # this chunk and the next ones on the step graphs, on the same cache
                steps = ('steps', mode[1][:4])
                self._cache_mode = steps
                dec_mem = obs_mem.to(model.pos_emb.dtype)
                kv_all = model.assemble_kv(time_kv, model.obs_kv(dec_mem))
                gates_fn = None
                if not forced_dense:
                    rows = gates if gates is not None else \
                        self._gate_map(runtime, time_mem, obs_mem)[0]
                    gates_fn = rows.tolist
                return self._graph(steps, model, kv_all, None, noise, step_noise).run(
                    kv_all, noise, step_noise, gates_fn, self.cache, ages)
            # graphs of replaced weights go (same schedule, other time K/V); one per gate source
            self._graphs = {m: g for m, g in list(self._graphs.items())[-3:]
                            if (m[0], m[1][:3]) != (mode[0], mode[1][:3])
                            or m[1][3] == mode[1][3]}
            self._graphs[mode] = graph
        graph = self._graphs[mode]
        if gates is None and graph.gate_fn is None and not forced_dense:
            gates = self._gate_map(runtime, time_mem, obs_mem)[0]
        nactions, plan = graph.run(obs_mem, noise, step_noise, self.cache, forced_dense, gates)
        ages.add_plan(plan)  # reads the device: after the whole chunk was issued
        return nactions, plan['executed']

    def _graph(self, mode: tuple, model, kv, obs_mem, noise, step_noise):
        """Return the graphs of ``mode``, built (and older schedules' dropped) on first use."""
        if mode not in self._graphs:
            from sparse_policy_node.core.cuda_graphs import DenseChunkGraph
            from sparse_policy_node.core.cuda_graphs import StepGraphs
            # Graphs of weights replaced since (refresh) are dropped; a handful of schedules
            # are kept (a node switching schedules back and forth captures once each).
            self._graphs = {m: g for m, g in list(self._graphs.items())[-3:]
                            if (m[0], m[1][:3]) != (mode[0], mode[1][:3])}
            if mode[0] == 'dense':  # kv: the schedule's time K/V
                graph = DenseChunkGraph(model, self.scheduler, kv, obs_mem, noise, step_noise)
            else:  # kv: this chunk's memory K/V (shapes of the static buffers)
                graph = StepGraphs(model, self.scheduler, kv, noise, step_noise)
            self._graphs[mode] = graph
        return self._graphs[mode]

    def close(self) -> None:
        """Stop the pruner worker thread."""
        self._worker.shutdown(wait=True)


def load_engine(model_dir: str, device: str = 'cpu',
                runtime: Optional[RuntimeConfig] = None) -> SparseEngine:
    """Load a model directory (policy + pruner when present) into a :class:`SparseEngine`.

    Every pruner of the directory is loaded (one per schedule; see
    :func:`checkpoint.pruner_dirs`) and checked against the policy weights it was trained for.
    Without ``runtime``, :func:`default_runtime`: the model's serving default
    (``serving.json``, written by ``sparse-policy frontier --install``), else its config's
    schedule with learned gates when it has a pruner for it, else dense.
    """
    from sparse_policy_node.core.checkpoint import load_policy
    from sparse_policy_node.core.checkpoint import load_pruners
    policy = load_policy(model_dir, device)
    pruners = load_pruners(model_dir, device)
    if runtime is None:
        runtime = default_runtime(model_dir)
    return SparseEngine(policy, pruners, runtime, model_dir=model_dir)


def default_runtime(model_dir: str) -> RuntimeConfig:
    """Return what a model directory serves when nothing else is given.

    Its serving default (``serving.json``) when it has one; else its config's schedule with
    learned gates when a pruner was trained for that schedule (at the max age it was trained
    with); else the schedule of its first pruner, with learned gates; else dense on its
    config's schedule.
    """
    from sparse_policy_node.core.checkpoint import load_policy_config
    from sparse_policy_node.core.checkpoint import pruner_dirs
    from sparse_policy_node.core.checkpoint import read_pruner_metadata
    served = serving_runtime(model_dir)
    if served is not None:
        return served
    sched = load_policy_config(model_dir).scheduler
    schedule = (sched.sampler, sched.num_inference_steps)
    dirs = pruner_dirs(model_dir)
    trained = for_schedule(dirs, schedule)
    if trained is None and any(s is not None for s in dirs):
        schedule = sorted(s for s in dirs if s is not None)[0]
        trained = dirs[schedule]
    if trained is None:
        return RuntimeConfig(sparsity_enabled=False, sampler=schedule[0],
                             num_inference_steps=schedule[1])
    age = read_pruner_metadata(trained).get('train_config', {}).get('rollout_max_age', 0)
    return RuntimeConfig(sampler=schedule[0], num_inference_steps=schedule[1],
                         rollout_max_age=int(age))


def serving_runtime(model_dir: str) -> Optional[RuntimeConfig]:
    """Return the model directory's serving default (``serving.json``), or None.

    ``sparse-policy frontier --install`` writes it: the point of the speed/success frontier
    chosen to serve (sampler, K, gates, dial, cache max age).
    """
    from sparse_policy_node.core.checkpoint import read_serving_config
    from sparse_policy_node.core.config import config_from_dict
    data = read_serving_config(model_dir)
    if data is None:
        return None
    return config_from_dict(RuntimeConfig, data['runtime'], 'serving.json runtime')
