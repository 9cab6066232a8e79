"""Typed configuration dataclasses, presets and their JSON round trip.

Architecture lives in :class:`PolicyConfig` (stored as ``config.json`` next to the weights);
run-time knobs live in :class:`RuntimeConfig` (mirrored one-to-one by ROS parameters).
Every dataclass validates itself in ``__post_init__`` and names the offending field.
"""

from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from dataclasses import fields
from dataclasses import is_dataclass
from dataclasses import replace
import typing
from typing import Optional
from typing import Tuple

from sparse_policy_node.core.keys import image_key


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


SAMPLERS = ('ddpm', 'ddim')
BETA_SCHEDULES = ('squaredcos_cap_v2', 'linear', 'scaled_linear')
TRUNKS = ('resnet18', 'small_cnn')
FEATURE_ACTIVATIONS = ('none', 'relu')
REUSE_DIRECTIONS = ('forward', 'timestep', 'rollout')
# The paper's sim target rho (tts_method.md, section 4.2): the pruners' training target and
# the sparsity at which the direction ablation compares reuse schedules (its Table 7).
MATCHED_SPARSITY = 0.93
GATE_SOURCES = ('pruner', 'static', 'random', 'dense')
PRECISIONS = ('float32', 'float16', 'bfloat16')
BACKENDS = ('torch', 'onnxruntime', 'tensorrt', 'auto')


@dataclass
class VisionConfig:
    """Per-camera image encoder (robomimic VisualCore layout, as Diffusion Policy uses it).

    Args:
        cameras: camera names; the observation key of camera ``c`` is ``f'{c}_image'``.
        image_size: (height, width) of the images fed to the policy.
        crop_size: (height, width) of the random (train) / centre (inference) crop.
        trunk: ``'resnet18'`` (GroupNorm ResNet-18, paper) or ``'small_cnn'`` (CPU-trainable).
        small_cnn_channels: channels of the 3x3 stride-2 conv stages of ``small_cnn``.
        num_keypoints: spatial-softmax keypoints.
        feature_dim: per-camera feature size after the final linear layer.
        feature_activation: applied to each camera's features: ``'none'`` (models trained
            here) or ``'relu'`` (robomimic's ``ObservationEncoder`` default, so every imported
            Diffusion Policy image policy).
    """

    cameras: Tuple[str, ...] = ('agentview',)
    image_size: Tuple[int, int] = (84, 84)
    crop_size: Tuple[int, int] = (76, 76)
    trunk: str = 'resnet18'
    small_cnn_channels: Tuple[int, ...] = (32, 64, 64, 128)
    num_keypoints: int = 32
    feature_dim: int = 64
    feature_activation: str = 'none'

    def __post_init__(self):
        _require(len(set(self.cameras)) == len(self.cameras),
                 f'VisionConfig.cameras must be unique, got {self.cameras!r}')
        _require(self.trunk in TRUNKS,
                 f'VisionConfig.trunk must be one of {TRUNKS}, got {self.trunk!r}')
        _require(len(self.image_size) == 2 and min(self.image_size) >= 8,
                 f'VisionConfig.image_size must be (H, W) >= 8, got {self.image_size!r}')
        _require(len(self.crop_size) == 2
                 and all(0 < c <= s for c, s in zip(self.crop_size, self.image_size)),
                 f'VisionConfig.crop_size must fit in image_size={self.image_size}, '
                 f'got {self.crop_size!r}')
        _require(self.num_keypoints > 0,
                 f'VisionConfig.num_keypoints must be > 0, got {self.num_keypoints}')
        _require(self.feature_dim > 0,
                 f'VisionConfig.feature_dim must be > 0, got {self.feature_dim}')
        _require(self.feature_activation in FEATURE_ACTIVATIONS,
                 f'VisionConfig.feature_activation must be one of {FEATURE_ACTIVATIONS}, '
                 f'got {self.feature_activation!r}')
        _require(len(self.small_cnn_channels) > 0 and min(self.small_cnn_channels) > 0,
                 f'VisionConfig.small_cnn_channels must be positive, '
                 f'got {self.small_cnn_channels!r}')


@dataclass
class ObsConfig:
    """Observation layout: cameras plus named low-dimensional (proprioception) vectors.

    Args:
        vision: image encoder settings; ``vision.cameras`` may be empty for state-only policies.
        lowdim: ``((key, dim), ...)`` low-dimensional observation vectors.
        order: observation keys (``f'{camera}_image'`` and low-dim keys) in the order their
            features are concatenated (robomimic uses the task's ``shape_meta`` order). Empty:
            cameras in ``vision.cameras`` order, then ``lowdim`` in order.
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    lowdim: Tuple[Tuple[str, int], ...] = (
        ('robot0_eef_pos', 3), ('robot0_eef_quat', 4), ('robot0_gripper_qpos', 2))
    order: Tuple[str, ...] = ()

    def __post_init__(self):
        self.lowdim = tuple((str(k), int(d)) for k, d in self.lowdim)
        self.order = tuple(self.order)
        own = [image_key(c) for c in self.vision.cameras] + [k for k, _ in self.lowdim]
        _require(not self.order or sorted(self.order) == sorted(own),
                 f'ObsConfig.order must list each observation key once, {sorted(own)}, '
                 f'got {self.order!r}')
        _require(all(d > 0 for _, d in self.lowdim),
                 f'ObsConfig.lowdim dims must be > 0, got {self.lowdim!r}')
        _require(len(self.vision.cameras) + len(self.lowdim) > 0,
                 'ObsConfig needs at least one camera or one lowdim key')

    @property
    def obs_feature_dim(self) -> int:
        """D_o: image features of every camera plus all low-dim dims."""
        return (len(self.vision.cameras) * self.vision.feature_dim
                + sum(d for _, d in self.lowdim))


@dataclass
class TransformerConfig:
    """Diffusion Policy transformer (DP-T, ``TransformerForDiffusion``, ``n_cond_layers=0``).

    Args:
        n_layer: decoder layers L; there are ``3 * L`` prunable residual units.
        n_head: attention heads.
        n_emb: width D.
        horizon: predicted action steps T_a.
        n_obs_steps: observation steps T_o (memory has ``1 + T_o`` tokens).
        action_dim: A.
        p_drop_attn: dropout inside the decoder layers (training only).
        p_drop_emb: dropout on embeddings (training only).
        causal_attn: causal self-attention and DP's memory mask (always True in DP-T).
    """

    n_layer: int = 8
    n_head: int = 4
    n_emb: int = 256
    horizon: int = 10
    n_obs_steps: int = 2
    action_dim: int = 10
    p_drop_attn: float = 0.3
    p_drop_emb: float = 0.0
    causal_attn: bool = True

    def __post_init__(self):
        for name in ('n_layer', 'n_head', 'n_emb', 'horizon', 'n_obs_steps', 'action_dim'):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0,
                     f'TransformerConfig.{name} must be a positive int, got {value!r}')
        _require(self.n_emb % self.n_head == 0,
                 f'TransformerConfig.n_emb={self.n_emb} must be divisible by '
                 f'n_head={self.n_head}')
        _require(self.n_emb % 2 == 0, f'TransformerConfig.n_emb must be even, got {self.n_emb}')
        for name in ('p_drop_attn', 'p_drop_emb'):
            value = getattr(self, name)
            _require(0.0 <= value < 1.0,
                     f'TransformerConfig.{name} must be in [0, 1), got {value!r}')
        _require(self.causal_attn, 'TransformerConfig.causal_attn must be True (DP-T layout)')

    @property
    def num_units(self) -> int:
        """U = 3 * n_layer prunable residual units."""
        return 3 * self.n_layer


@dataclass
class SchedulerConfig:
    """Noise scheduler (diffusers ``DDPMScheduler`` / ``DDIMScheduler`` definitions).

    Args:
        sampler: ``'ddpm'`` or ``'ddim'`` (deterministic, eta 0).
        num_train_timesteps: training diffusion steps.
        num_inference_steps: K, denoising steps per chunk at inference.
        beta_start: first beta (linear schedules only).
        beta_end: last beta (linear schedules only).
        beta_schedule: ``'squaredcos_cap_v2'`` (DP default), ``'linear'`` or ``'scaled_linear'``.
        clip_sample: clip the predicted clean sample to ``[-clip_sample_range, range]``.
        clip_sample_range: clipping bound.
    """

    sampler: str = 'ddpm'
    num_train_timesteps: int = 100
    num_inference_steps: int = 100
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = 'squaredcos_cap_v2'
    clip_sample: bool = True
    clip_sample_range: float = 1.0

    def __post_init__(self):
        _require(self.sampler in SAMPLERS,
                 f'SchedulerConfig.sampler must be one of {SAMPLERS}, got {self.sampler!r}')
        _require(self.beta_schedule in BETA_SCHEDULES,
                 f'SchedulerConfig.beta_schedule must be one of {BETA_SCHEDULES}, '
                 f'got {self.beta_schedule!r}')
        _require(isinstance(self.num_train_timesteps, int) and self.num_train_timesteps >= 2,
                 f'SchedulerConfig.num_train_timesteps must be an int >= 2, '
                 f'got {self.num_train_timesteps!r}')
        _require(isinstance(self.num_inference_steps, int)
                 and 1 <= self.num_inference_steps <= self.num_train_timesteps,
                 f'SchedulerConfig.num_inference_steps must be an int in '
                 f'[1, num_train_timesteps={self.num_train_timesteps}], '
                 f'got {self.num_inference_steps!r}')
        _require(0.0 < self.beta_start < self.beta_end < 1.0,
                 f'SchedulerConfig needs 0 < beta_start < beta_end < 1, '
                 f'got {self.beta_start!r}, {self.beta_end!r}')
        _require(self.clip_sample_range > 0,
                 f'SchedulerConfig.clip_sample_range must be > 0, got {self.clip_sample_range!r}')


@dataclass
class PolicyConfig:
    """Architecture of a visuomotor diffusion policy; stored as ``config.json``.

    Args:
        obs: observation layout and image encoder.
        transformer: DP-T backbone.
        scheduler: training noise scheduler and the default inference sampler.
        n_action_steps: actions executed per chunk, taken from index ``T_o - 1`` of the
            predicted horizon (Diffusion Policy's convention).
    """

    obs: ObsConfig = field(default_factory=ObsConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    n_action_steps: int = 8

    def __post_init__(self):
        t = self.transformer
        _require(isinstance(self.n_action_steps, int) and self.n_action_steps >= 1,
                 f'PolicyConfig.n_action_steps must be an int >= 1, got {self.n_action_steps!r}')
        _require(t.n_obs_steps - 1 + self.n_action_steps <= t.horizon,
                 f'PolicyConfig.n_action_steps={self.n_action_steps} does not fit: '
                 f'n_obs_steps - 1 + n_action_steps must be <= horizon={t.horizon}')


@dataclass
class PrunerConfig:
    """TTS pruner: one pre-norm transformer-decoder layer, unit-index queries, step memory.

    The paper's pruner uses ``hidden_dim=512``, 8 heads, FFN 1024 (about 6.6 GMAC per chunk,
    83% of the dense DP-T). Ours defaults to a narrower layer (H 64, FFN 128: about 0.05 GMAC
    per DDPM-100 chunk, 0.6% of the dense DP-T) and evaluates the constant parts (query
    self-attention, query projection, observation tokens) once per chunk.

    Args:
        hidden_dim: H.
        n_head: attention heads.
        dim_feedforward: FFN width.
        dropout: dropout (training only).
    """

    hidden_dim: int = 64
    n_head: int = 4
    dim_feedforward: int = 128
    dropout: float = 0.1

    def __post_init__(self):
        for name in ('hidden_dim', 'n_head', 'dim_feedforward'):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0,
                     f'PrunerConfig.{name} must be a positive int, got {value!r}')
        _require(self.hidden_dim % self.n_head == 0 and self.hidden_dim % 2 == 0,
                 f'PrunerConfig.hidden_dim={self.hidden_dim} must be even and divisible by '
                 f'n_head={self.n_head}')
        _require(0.0 <= self.dropout < 1.0,
                 f'PrunerConfig.dropout must be in [0, 1), got {self.dropout!r}')


@dataclass
class RuntimeConfig:
    """Run-time knobs of sparse inference; mirrored one-to-one by the node's ROS parameters.

    Args:
        sparsity_enabled: False runs every unit at every step (dense).
        gate_source: where gates come from: ``'pruner'`` (learned), ``'static'`` (FORA-style
            fixed-interval reuse), ``'random'`` (speed studies) or ``'dense'``.
        target_sparsity: the dial. Negative: use the pruner's argmax gates as trained.
            In [0, 0.99]: keep exactly the ``1 - s`` share of (step, unit) entries with the
            highest compute preference and reuse the rest.
        directions: allowed reuse directions, a non-empty subset of
            ``('forward', 'timestep', 'rollout')``.
        sampler: ``'ddpm'`` or ``'ddim'``.
        num_inference_steps: K.
        rollout_max_age: cache aging, in chunks: a rollout-cache slot written more than this
            many chunks ago is not reused (the unit computes and refreshes it). 0 never
            expires a slot (the paper's semantics).
        precision: dtype of the denoiser's weights and activations: ``'float32'`` (default),
            ``'float16'`` or ``'bfloat16'``. The vision encoder, the pruner and the scheduler
            stay float32. Reduced precision was checked offline only (``sparse-policy
            precision``), not in closed loop, so float32 stays the default.
        cuda_graphs: on CUDA, run batch-1 chunks from captured CUDA graphs (a whole-chunk
            graph for dense runtimes, one graph per step pattern for sparse ones; see
            :mod:`cuda_graphs`); same values as eager, 4-5x faster dense and 2-3x faster
            sparse chunks on an H200 (README). Ignored on the CPU.
        backend: who runs the model pieces: ``'torch'`` (eager), ``'onnxruntime'`` (exported
            graphs on the CPU) or ``'tensorrt'`` (engines built from the same graphs, CUDA);
            see :mod:`backends`. Graphs are exported and loaded when the backend is set, never
            inside a chunk. ``'auto'`` (the policy node's default): onnxruntime on the CPU
            when it is importable and the precision is float32 (faster there, see README),
            else torch. The library default stays torch, the bit-exact reference.
    """

    sparsity_enabled: bool = True
    gate_source: str = 'pruner'
    target_sparsity: float = -1.0
    directions: Tuple[str, ...] = REUSE_DIRECTIONS
    sampler: str = 'ddpm'
    num_inference_steps: int = 100
    rollout_max_age: int = 0
    precision: str = 'float32'
    cuda_graphs: bool = True
    backend: str = 'torch'

    def __post_init__(self):
        self.directions = tuple(self.directions)
        _require(isinstance(self.sparsity_enabled, bool),
                 f'RuntimeConfig.sparsity_enabled must be a bool, '
                 f'got {self.sparsity_enabled!r}')
        _require(self.gate_source in GATE_SOURCES,
                 f'RuntimeConfig.gate_source must be one of {GATE_SOURCES}, '
                 f'got {self.gate_source!r}')
        s = self.target_sparsity
        _require(isinstance(s, (int, float)) and s == s and (s < 0 or s <= 0.99),
                 f'RuntimeConfig.target_sparsity must be negative (learned gates) or in '
                 f'[0, 0.99], got {s!r}')
        _require(len(self.directions) > 0
                 and all(d in REUSE_DIRECTIONS for d in self.directions)
                 and len(set(self.directions)) == len(self.directions),
                 f'RuntimeConfig.directions must be a non-empty subset of {REUSE_DIRECTIONS}, '
                 f'got {self.directions!r}')
        _require(self.sampler in SAMPLERS,
                 f'RuntimeConfig.sampler must be one of {SAMPLERS}, got {self.sampler!r}')
        _require(isinstance(self.num_inference_steps, int) and self.num_inference_steps >= 1,
                 f'RuntimeConfig.num_inference_steps must be an int >= 1, '
                 f'got {self.num_inference_steps!r}')
        _require(isinstance(self.rollout_max_age, int)
                 and not isinstance(self.rollout_max_age, bool) and self.rollout_max_age >= 0,
                 f'RuntimeConfig.rollout_max_age must be an int >= 0 (0: never expire), '
                 f'got {self.rollout_max_age!r}')
        _require(self.precision in PRECISIONS,
                 f'RuntimeConfig.precision must be one of {PRECISIONS}, got {self.precision!r}')
        _require(isinstance(self.cuda_graphs, bool),
                 f'RuntimeConfig.cuda_graphs must be a bool, got {self.cuda_graphs!r}')
        _require(self.backend in BACKENDS,
                 f'RuntimeConfig.backend must be one of {BACKENDS}, got {self.backend!r}')
        _require(self.gate_source != 'static' or s >= 0,
                 'RuntimeConfig.target_sparsity must be set (>= 0) for gate_source=static')
        _require(self.gate_source != 'random' or s >= 0,
                 'RuntimeConfig.target_sparsity must be set (>= 0) for gate_source=random')

    def replace(self, **changes) -> 'RuntimeConfig':
        """Return a copy with ``changes`` applied and the other knobs kept (validated).

        Start from what an engine serves, e.g. ``engine.runtime.replace(target_sparsity=0.8)``:
        a fresh ``RuntimeConfig(...)`` starts from the library defaults (DDPM-100) instead.
        """
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise ConfigError(f'RuntimeConfig has no field {unknown[0]!r}; fields: '
                              f'{[f.name for f in fields(self)]}')
        return replace(self, **changes)


# ==== presets ====

def paper_config() -> PolicyConfig:
    """Image-sim DP-T of the paper: 8 layers, 4 heads, width 256, T_a 10, T_o 2, DDPM-100."""
    return PolicyConfig(
        obs=ObsConfig(vision=VisionConfig(cameras=('agentview', 'robot0_eye_in_hand'),
                                          trunk='resnet18')),
        transformer=TransformerConfig(n_layer=8, n_head=4, n_emb=256, horizon=10,
                                      n_obs_steps=2, action_dim=10, p_drop_attn=0.3),
        scheduler=SchedulerConfig(sampler='ddpm', num_inference_steps=100),
        n_action_steps=8)


def small_config() -> PolicyConfig:
    """CPU-trainable visuomotor policy: one 84x84 camera, small CNN, 4 layers of width 192."""
    return PolicyConfig(
        obs=ObsConfig(vision=VisionConfig(cameras=('agentview',), trunk='small_cnn',
                                          small_cnn_channels=(32, 64, 64))),
        transformer=TransformerConfig(n_layer=4, n_head=4, n_emb=192, horizon=10,
                                      n_obs_steps=2, action_dim=7, p_drop_attn=0.1),
        scheduler=SchedulerConfig(sampler='ddpm', num_inference_steps=100),
        n_action_steps=8)


def tiny_config() -> PolicyConfig:
    """Seconds-fast config for tests: 2 layers of width 32, 32x32 images, DDPM-10."""
    return PolicyConfig(
        obs=ObsConfig(vision=VisionConfig(cameras=('agentview',), image_size=(32, 32),
                                          crop_size=(28, 28), trunk='small_cnn',
                                          small_cnn_channels=(8, 16), num_keypoints=8,
                                          feature_dim=16)),
        transformer=TransformerConfig(n_layer=2, n_head=2, n_emb=32, horizon=6, n_obs_steps=2,
                                      action_dim=7, p_drop_attn=0.0),
        scheduler=SchedulerConfig(sampler='ddpm', num_train_timesteps=20,
                                  num_inference_steps=10),
        n_action_steps=4)


PRESETS = {'paper': paper_config, 'small': small_config, 'tiny': tiny_config}


def make_preset(name: str) -> PolicyConfig:
    """Return a fresh :class:`PolicyConfig` preset by name."""
    if name not in PRESETS:
        raise ConfigError(f'unknown preset {name!r}; valid presets: {sorted(PRESETS)}')
    return PRESETS[name]()


# ==== dict / JSON round trip ====

def config_to_dict(config) -> dict:
    """Convert a config dataclass (nested) into plain JSON-serialisable data."""
    return asdict(config)


def _convert(value, annotation, where: str):
    origin = typing.get_origin(annotation)
    if is_dataclass(annotation):
        return config_from_dict(annotation, value, where)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in typing.get_args(annotation) if a is not type(None)][0]
        return _convert(value, inner, where)
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f'{where} must be a list, got {value!r}')
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f'{where}[{i}]') for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f'{where} must have {len(args)} entries, got {value!r}')
        return tuple(_convert(v, a, f'{where}[{i}]') for i, (v, a) in enumerate(zip(value, args)))
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool) and not isinstance(value, annotation):
        raise ConfigError(f'{where} must be {annotation.__name__}, got {value!r}')
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f'{where} must be int, got {value!r}')
    return value


def config_from_dict(cls, data: dict, where: Optional[str] = None):
    """Build dataclass ``cls`` from plain data; unknown or ill-typed keys name the field."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f'{where} must be a mapping, got {type(data).__name__}')
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f'{where} has unknown field(s) {unknown}; valid fields: '
                          f'{sorted(known)}')
    kwargs = {name: _convert(value, hints[name], f'{where}.{name}')
              for name, value in data.items()}
    return cls(**kwargs)
