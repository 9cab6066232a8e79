"""Golden conformance of the Diffusion Policy import: image path and DP-T.

Compared against an independent implementation of the upstream semantics (``dp_reference``),
no network.

The observation keys are interleaved on purpose (camera, low-dim, camera, low-dim) and one
camera has DP's real-robot name ``camera_0``: sorted-cameras-then-low-dim would be wrong here.
"""

import dp_reference as ref
import pytest
from sparse_policy_node.core.dp_config import spec_from_config
from sparse_policy_node.core.dp_import import convert_state_dict
from sparse_policy_node.core.dp_import import infer_config
from sparse_policy_node.core.policy import DiffusionPolicy
import torch

OBS_META = {
    'sideview_image': {'shape': [3, 40, 40], 'type': 'rgb'},
    'robot0_eef_pos': {'shape': [3]},
    'camera_0': {'shape': [3, 40, 40], 'type': 'rgb'},
    'gripper': {'shape': [1], 'type': 'low_dim'},
}
OUR_KEY = {'sideview_image': 'sideview_image', 'camera_0': 'camera_0_image',
           'robot0_eef_pos': 'robot0_eef_pos', 'gripper': 'gripper'}


@pytest.fixture(scope='module')
def upstream():
    cfg = ref.dp_config(OBS_META)
    return cfg, ref.dp_state_dict(cfg, seed=3)


def import_policy(state, cfg, **obs_overrides):
    config = infer_config(state, spec_from_config(cfg))
    for name, value in obs_overrides.items():  # used to show the test's sensitivity
        if name == 'feature_activation':
            config.obs.vision.feature_activation = value
        else:
            setattr(config.obs, name, value)
    policy = DiffusionPolicy(config).eval()
    policy.load_state_dict(convert_state_dict(state), strict=True)
    return policy


def dp_obs(seed=0, batch=2, T_o=2):
    g = torch.Generator().manual_seed(seed)
    obs = {}
    for key, attr in OBS_META.items():
        if attr.get('type') == 'rgb':
            obs[key] = torch.randint(0, 256, (batch, T_o, *attr['shape']), generator=g,
                                     dtype=torch.uint8)
        else:
            obs[key] = torch.randn(batch, T_o, *attr['shape'], generator=g)
    return obs


def our_features(policy, obs):
    with torch.no_grad():
        return policy.encode_obs({OUR_KEY[k]: v for k, v in obs.items()})


def test_image_features_match_robomimic_semantics(upstream):
    cfg, state = upstream
    policy = import_policy(state, cfg)
    assert policy.config.obs.vision.cameras == ('sideview', 'camera_0')
    assert policy.config.obs.order == ('sideview_image', 'robot0_eef_pos', 'camera_0_image',
                                       'gripper')
    obs = dp_obs()
    expected = ref.obs_features(state, cfg, obs)  # (B, T_o, 16 + 3 + 16 + 1)
    got = our_features(policy, obs)
    assert got.shape == expected.shape == (2, 2, 36)
    # Feature by feature: each key's slice, in shape_meta order.
    start = 0
    for key, width in (('sideview_image', 16), ('robot0_eef_pos', 3), ('camera_0', 16),
                       ('gripper', 1)):
        torch.testing.assert_close(got[..., start:start + width],
                                   expected[..., start:start + width], atol=1e-5, rtol=1e-5,
                                   msg=lambda m, key=key: f'{key}: {m}')
        start += width
    assert (expected[..., :16] == 0).any()  # the ReLU is active on these weights


def test_golden_test_fails_without_relu_or_order(upstream):
    """The comparison above is sensitive to both: either removal changes the features."""
    cfg, state = upstream
    obs = dp_obs()
    expected = ref.obs_features(state, cfg, obs)
    no_relu = our_features(import_policy(state, cfg, feature_activation='none'), obs)
    assert not torch.allclose(no_relu, expected, atol=1e-3)
    guessed_order = our_features(import_policy(state, cfg, order=()), obs)
    assert not torch.allclose(guessed_order, expected, atol=1e-3)
    # ...and the reference itself distinguishes them too.
    assert torch.allclose(no_relu, ref.obs_features(state, cfg, obs, relu=False), atol=1e-5)


def test_transformer_matches_reference_decoder(upstream):
    cfg, state = upstream
    policy = import_policy(state, cfg)
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(2, 2, 36, generator=g)
    sample = torch.randn(2, 10, 4, generator=g)
    for t in (0, 37, 99):
        expected = ref.transformer_eps(state, cfg, sample, t, cond)
        with torch.no_grad():
            got = policy.transformer(sample, torch.tensor([t, t]), cond)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_config_sets_sampler_and_chunk(upstream):
    cfg, state = upstream
    policy = import_policy(state, cfg)
    assert (policy.config.scheduler.sampler, policy.config.scheduler.num_inference_steps) == (
        'ddim', 8)
    assert policy.config.n_action_steps == 6
    assert policy.config.obs.vision.crop_size == (36, 36)
    obs = {OUR_KEY[k]: v[:1] for k, v in dp_obs().items()}
    out = policy.predict_action(obs, generator=torch.Generator().manual_seed(0))
    assert out['action'].shape == (1, 6, 4) and torch.isfinite(out['action']).all()
