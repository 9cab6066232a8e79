"""Observation encoder: per-camera image trunk + spatial softmax + linear, plus low-dim state.

Mirrors robomimic's ``VisualCore`` as Diffusion Policy configures it (ResNet-18 trunk without
pretraining, BatchNorm replaced by GroupNorm with ``C // 16`` groups, 32 spatial-softmax
keypoints, linear to 64 features per camera; random crop in training, centre crop at
inference). A smaller conv trunk is selectable for CPU training. torchvision is not usable with
the CPU torch wheel of these machines, so the ResNet-18 trunk is defined here.
"""

from typing import Dict
from typing import Optional
from typing import Sequence
from typing import Tuple

from sparse_policy_node.core.config import VisionConfig
import torch
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    """Make a GroupNorm with ``channels // 16`` groups (DP's BatchNorm replacement), at least 1."""
    return nn.GroupNorm(max(1, channels // 16), channels)


class BasicBlock(nn.Module):
    """ResNet basic block with GroupNorm; attribute names follow torchvision."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = group_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = group_norm(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False),
                                            group_norm(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, H / stride, W / stride)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


def resnet18_trunk() -> nn.Sequential:
    """ResNet-18 without avgpool/fc, GroupNorm everywhere; indices match robomimic's layout."""
    def stage(in_ch, out_ch, stride):
        return nn.Sequential(BasicBlock(in_ch, out_ch, stride), BasicBlock(out_ch, out_ch, 1))

    return nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False), group_norm(64), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
        stage(64, 64, 1), stage(64, 128, 2), stage(128, 256, 2), stage(256, 512, 2))


def small_cnn_trunk(channels: Sequence[int]) -> nn.Sequential:
    """3x3 stride-2 conv + GroupNorm + ReLU stages: a CPU-trainable trunk."""
    layers, in_ch = [], 3
    for out_ch in channels:
        layers += [nn.Conv2d(in_ch, out_ch, 3, 2, 1), group_norm(out_ch), nn.ReLU(inplace=True)]
        in_ch = out_ch
    return nn.Sequential(*layers)


class SpatialSoftmax(nn.Module):
    """Keypoints as softmax-weighted mean image coordinates (Levine et al. 2016).

    A 1x1 conv maps trunk channels to ``num_keypoints`` maps; each map's softmax over pixels
    gives an expected (x, y) in [-1, 1].
    """

    def __init__(self, in_channels: int, height: int, width: int, num_keypoints: int):
        super().__init__()
        self.nets = nn.Conv2d(in_channels, num_keypoints, kernel_size=1)
        pos_y, pos_x = torch.meshgrid(torch.linspace(-1.0, 1.0, height),
                                      torch.linspace(-1.0, 1.0, width), indexing='ij')
        self.register_buffer('pos_x', pos_x.reshape(1, height * width), persistent=False)
        self.register_buffer('pos_y', pos_y.reshape(1, height * width), persistent=False)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) features -> (N, num_keypoints * 2) keypoint coordinates."""
        maps = self.nets(feat)
        N, kp, H, W = maps.shape
        attention = torch.softmax(maps.reshape(N * kp, H * W), dim=-1)
        x = (attention * self.pos_x).sum(dim=1)
        y = (attention * self.pos_y).sum(dim=1)
        return torch.stack((x, y), dim=-1).reshape(N, kp * 2)


class VisualCore(nn.Module):
    """One camera: trunk -> spatial softmax -> linear to ``feature_dim``."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        if config.trunk == 'resnet18':
            self.trunk = resnet18_trunk()
        else:
            self.trunk = small_cnn_trunk(config.small_cnn_channels)
        with torch.no_grad():
            c, h, w = self.trunk(torch.zeros(1, 3, *config.crop_size)).shape[1:]
        self.pool = SpatialSoftmax(c, h, w, config.num_keypoints)
        self.linear = nn.Linear(config.num_keypoints * 2, config.feature_dim)
        self.relu = config.feature_activation == 'relu'

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) images in [-1, 1] (already cropped) -> (N, feature_dim).

        robomimic's ``ObservationEncoder`` applies its ``feature_activation`` (ReLU by
        default) to the output of every observation net; ``feature_activation='relu'``
        reproduces that for imported policies.
        """
        features = self.linear(self.pool(self.trunk(image)))
        return torch.relu(features) if self.relu else features


def crop_images(images: torch.Tensor, crop: Tuple[int, int], random: bool,
                generator: torch.Generator = None) -> torch.Tensor:
    """Crop (N, C, H, W) images to ``crop``: a random window per image, or the centre.

    Returns:
        (N, C, crop_h, crop_w).
    """
    N, C, H, W = images.shape
    ch, cw = crop
    if (ch, cw) == (H, W):
        return images
    if not random:
        top, left = (H - ch) // 2, (W - cw) // 2
        return images[:, :, top:top + ch, left:left + cw]
    tops = torch.randint(0, H - ch + 1, (N,), generator=generator).tolist()
    lefts = torch.randint(0, W - cw + 1, (N,), generator=generator).tolist()
    return torch.stack([images[i, :, t:t + ch, s:s + cw]
                        for i, (t, s) in enumerate(zip(tops, lefts))])


class ObsEncoder(nn.Module):
    """Encode an observation window into per-step condition features.

    Input keys: ``f'{camera}_image'`` as (B, T_o, 3, H, W) uint8 (or float in [0, 255]) and
    each low-dim key as (B, T_o, dim), already normalized. Output (B, T_o, D_o): the features
    of every key concatenated in ``order`` (default: cameras in config order, then the
    low-dim vectors in config order).
    """

    def __init__(self, config: VisionConfig, lowdim: Sequence[Tuple[str, int]],
                 order: Sequence[str] = ()):
        super().__init__()
        self.config = config
        self.lowdim = tuple(lowdim)
        self.order = tuple(order)
        self.obs_nets = nn.ModuleDict({cam: VisualCore(config) for cam in config.cameras})

    def encode_camera(self, camera: str, images: torch.Tensor) -> torch.Tensor:
        """Encode frames of one camera, each on its own (the eval crop is deterministic).

        Args:
            camera: a name from ``config.cameras``.
            images: (N, 3, H, W) uint8 (or float in [0, 255]).

        Returns:
            (N, feature_dim) features.
        """
        img = images.float() * (2.0 / 255.0) - 1.0
        img = crop_images(img, self.config.crop_size, random=self.training)
        return self.obs_nets[camera](img)

    def combine(self, camera_features: Sequence[torch.Tensor],
                lowdim: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate per-camera (B, T_o, F) and normalized low-dim (B, T_o, d) features.

        Args:
            camera_features: one tensor per camera, in ``config.cameras`` order.
            lowdim: one tensor per low-dim key, in ``lowdim`` order.

        Returns:
            (B, T_o, D_o) in ``order`` (cameras then low-dim when ``order`` is empty).
        """
        parts = [*camera_features, *(x.float() for x in lowdim)]
        if not self.order:
            return torch.cat(parts, dim=-1)
        names = [f'{c}_image' for c in self.config.cameras] + [k for k, _ in self.lowdim]
        by_name = dict(zip(names, parts))
        return torch.cat([by_name[key] for key in self.order], dim=-1)

    def forward(self, obs: Dict[str, torch.Tensor],
                camera_features: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """Return (B, T_o, D_o) features; see the class docstring for the input layout.

        ``camera_features`` optionally gives (B, T_o, F) features of some image keys, computed
        ahead of time; those cameras are not encoded again.
        """
        camera_features = camera_features or {}
        feats = []
        for cam in self.config.cameras:
            key = f'{cam}_image'
            if key in camera_features:
                feats.append(camera_features[key])
                continue
            img = obs[key]
            B, T = img.shape[:2]
            feats.append(self.encode_camera(cam, img.reshape(B * T, *img.shape[2:]))
                         .reshape(B, T, -1))  # (B, T_o, F)
        return self.combine(feats, [obs[key] for key, _ in self.lowdim])
