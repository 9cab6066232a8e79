"""Import of Diffusion Policy DP-T state dicts (upstream key names) into our layout."""

from conftest import make_obs
import pytest
from sparse_policy_node.core.config import ObsConfig
from sparse_policy_node.core.config import PolicyConfig
from sparse_policy_node.core.config import TransformerConfig
from sparse_policy_node.core.config import VisionConfig
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
                                          crop_size=(36, 36), trunk='resnet18')),
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
