"""Import of Diffusion Policy DP-T state dicts (upstream key names) into our layout."""

from conftest import make_obs
import dp_reference as ref
import pytest
from sparse_policy_node.core.config import ObsConfig
from sparse_policy_node.core.config import PolicyConfig
from sparse_policy_node.core.config import tiny_config
from sparse_policy_node.core.config import TransformerConfig
from sparse_policy_node.core.config import VisionConfig
from sparse_policy_node.core.dp_config import DPConfigError
from sparse_policy_node.core.dp_config import resolve
from sparse_policy_node.core.dp_config import spec_from_config
from sparse_policy_node.core.dp_import import check_image_normalizer
from sparse_policy_node.core.dp_import import convert_state_dict
from sparse_policy_node.core.dp_import import DPImportError
from sparse_policy_node.core.dp_import import infer_config
from sparse_policy_node.core.policy import DiffusionPolicy
import torch


def upstream_state_dict(policy):
    """Rename our tensors to real-stanford/diffusion_policy's names (the inverse mapping).

    Written independently of ``convert_state_dict``, key by key from the upstream layout:
    ``model.decoder.layers.{i}``, ``obs_encoder.obs_nets.{cam}_image.nets.{0,1,3}`` and
    ``normalizer.params_dict.{key}.{scale,offset}``, plus DP's buffers.
    """
    up = {}
    for key, value in policy.state_dict().items():
        if key.startswith('transformer.'):
            name = key[len('transformer.'):]
            if name.startswith('layers.'):
                name = 'decoder.' + name
            up['model.' + name] = value.clone()
        elif key.startswith('obs_encoder.obs_nets.'):
            cam, part, rest = key[len('obs_encoder.obs_nets.'):].split('.', 2)
            index = {'trunk': '0.nets', 'pool': '1', 'linear': '3'}[part]
            up[f'obs_encoder.obs_nets.{cam}_image.nets.{index}.{rest}'] = value.clone()
        elif key.startswith('normalizer.'):
            name, kind = key[len('normalizer.'):].split('__')
            up[f'normalizer.params_dict.{name}.{kind}'] = value.clone()
    t = policy.config.transformer
    up['model.mask'] = torch.zeros(t.horizon, t.horizon)
    up['model.memory_mask'] = torch.zeros(t.horizon, 1 + t.n_obs_steps)
    up['model._dummy_variable'] = torch.zeros(1)
    up['normalizer.params_dict.agentview_image.scale'] = torch.full((3, 1, 1), 2.0)
    up['normalizer.params_dict.agentview_image.offset'] = torch.full((3, 1, 1), -1.0)
    return up


@pytest.fixture
def resnet_policy():
    cfg = PolicyConfig(
        obs=ObsConfig(vision=VisionConfig(cameras=('agentview',), image_size=(40, 40),
                                          crop_size=(36, 36), trunk='resnet18',
                                          feature_activation='relu')),
        transformer=TransformerConfig(n_layer=2, n_head=4, n_emb=32, horizon=10, n_obs_steps=2,
                                      action_dim=10, p_drop_attn=0.3),
        n_action_steps=8)
    torch.manual_seed(1)
    policy = DiffusionPolicy(cfg).eval()
    policy.normalizer.fit('action', torch.randn(50, 10))
    policy.normalizer.fit('robot0_eef_pos', torch.randn(50, 3))
    return policy


def test_upstream_keys_map_back_and_outputs_match(resnet_policy):
    up = upstream_state_dict(resnet_policy)
    assert 'model.decoder.layers.1.multihead_attn.in_proj_weight' in up
    assert 'obs_encoder.obs_nets.agentview_image.nets.0.nets.4.0.conv1.weight' in up
    assert 'obs_encoder.obs_nets.agentview_image.nets.1.nets.weight' in up
    cfg = infer_config(up, n_head=4, image_size=(40, 40), crop_size=(36, 36))
    assert cfg.transformer == resnet_policy.config.transformer
    assert cfg.obs == resnet_policy.config.obs
    check_image_normalizer(up)
    imported = DiffusionPolicy(cfg).eval()
    imported.load_state_dict(convert_state_dict(up), strict=True)
    obs = make_obs(resnet_policy)
    noise, step_noise = torch.randn(1, 10, 10), torch.randn(100, 1, 10, 10)
    a = resnet_policy.predict_action(obs, noise=noise, step_noise=step_noise)['action']
    b = imported.predict_action(obs, noise=noise, step_noise=step_noise)['action']
    assert torch.equal(a, b)


def test_not_a_dp_checkpoint_is_rejected():
    with pytest.raises(DPImportError, match='model.pos_emb'):
        infer_config({'foo': torch.zeros(1)})


def test_unexpected_image_normalizer_is_rejected(resnet_policy):
    up = upstream_state_dict(resnet_policy)
    up['normalizer.params_dict.agentview_image.scale'] = torch.ones(3, 1, 1)
    with pytest.raises(DPImportError, match='agentview_image'):
        check_image_normalizer(up)


# ==== the policy config (sidecar) ====

REAL_META = {'camera_1': {'shape': [3, 48, 64], 'type': 'rgb'},
             'robot_eef_pose': {'shape': [2], 'type': 'low_dim'}}


def test_interpolations_resolve_like_hydra():
    cfg = {'a': 3, 'b': {'c': [1, '${a}']}, 'd': '${b}', 'e': "${eval:'${a}*2+1'}",
           'f': 'x-${a}'}
    assert resolve(cfg) == {'a': 3, 'b': {'c': [1, 3]}, 'd': {'c': [1, 3]}, 'e': 7,
                            'f': 'x-3'}
    with pytest.raises(DPConfigError, match='arithmetic'):
        resolve({'e': "${eval:'__import__(\"os\")'}"})
    with pytest.raises(DPConfigError, match='missing'):
        resolve({'d': '${nope.x}'})


def test_spec_reads_order_sampler_chunk_and_crop():
    spec = spec_from_config(ref.dp_config(REAL_META, horizon=16, n_action_steps=8,
                                          crop=(40, 56)))
    assert spec.obs == (('camera_1', 'rgb', (3, 48, 64)), ('robot_eef_pose', 'low_dim', (2,)))
    assert (spec.horizon, spec.n_obs_steps, spec.n_action_steps) == (16, 2, 8)
    assert spec.crop == (40, 56)
    assert (spec.scheduler.sampler, spec.scheduler.num_inference_steps) == ('ddim', 8)
    # The policy section alone works too (already resolved).
    section = resolve(ref.dp_config(REAL_META))['policy']
    assert spec_from_config(section).image_keys == ('camera_1',)


def test_any_camera_name_imports_with_the_config():
    cfg = ref.dp_config(REAL_META, horizon=16, n_action_steps=8, crop=(40, 56))
    state = ref.dp_state_dict(cfg)
    config = infer_config(state, spec_from_config(cfg))
    assert config.obs.vision.cameras == ('camera_1',)
    assert config.obs.vision.image_size == (48, 64) and config.obs.vision.crop_size == (40, 56)
    assert config.obs.order == ('camera_1_image', 'robot_eef_pose')
    policy = DiffusionPolicy(config).eval()
    policy.load_state_dict(convert_state_dict(state), strict=True)
    assert policy.predict_action(make_obs(policy))['action'].shape == (1, 8, 4)


@pytest.mark.parametrize('target', ['diffusion_policy.policy.diffusion_unet_hybrid_image_'
                                    'policy.DiffusionUnetHybridImagePolicy',
                                    'diffusion_policy.policy.diffusion_unet_image_policy.'
                                    'DiffusionUnetImagePolicy'])
def test_unet_config_is_refused_with_the_reason(target):
    with pytest.raises(DPConfigError, match='U-Net.*residual units'):
        spec_from_config(ref.dp_config(REAL_META, policy_target=target))


def test_unet_weights_are_refused_with_the_reason():
    with pytest.raises(DPConfigError, match='U-Net'):
        infer_config({'model.diffusion_step_encoder.1.weight': torch.zeros(1)})


@pytest.mark.parametrize('change, match', [
    (lambda c: c['policy']['noise_scheduler'].update(prediction_type='sample'),
     'prediction_type'),
    (lambda c: c['policy']['noise_scheduler'].update(
        _target_='diffusers.schedulers.EulerDiscreteScheduler'), 'EulerDiscreteScheduler'),
    (lambda c: c['policy'].update(n_cond_layers=2), 'n_cond_layers'),
    (lambda c: c['policy'].update(obs_encoder_group_norm=False), 'obs_encoder_group_norm'),
    (lambda c: c['task']['shape_meta']['obs']['camera_1'].update(type='depth'), 'depth'),
    (lambda c: c['policy'].pop('n_head'), 'n_head'),
])
def test_unsupported_configs_name_the_field(change, match):
    cfg = ref.dp_config(REAL_META)
    change(cfg)
    with pytest.raises(DPConfigError, match=match):
        spec_from_config(cfg)


def test_config_that_does_not_fit_the_weights_is_refused():
    cfg = ref.dp_config(REAL_META)
    state = ref.dp_state_dict(cfg)
    cfg['horizon'] = 12
    with pytest.raises(DPConfigError, match='horizon=12 but the weights have 10'):
        infer_config(state, spec_from_config(cfg))


def test_default_config_reproduces_models_trained_here():
    """New fields default to today's behaviour: no activation, cameras then low-dim."""
    config = tiny_config()
    assert config.obs.vision.feature_activation == 'none' and config.obs.order == ()
    torch.manual_seed(0)
    policy = DiffusionPolicy(config).eval()
    obs = make_obs(policy)
    feats = policy.encode_obs(obs)
    camera = policy.obs_encoder.encode_camera('agentview', obs['agentview_image'][0])
    assert torch.equal(feats[0, :, :16], camera)
    assert (camera < 0).any()  # no ReLU
