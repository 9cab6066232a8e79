"""DP-T backbone: shapes, per-unit API composition, parity with torch's decoder layer."""

from conftest import make_obs
from sparse_policy_node.core.sampler import dense_step
from sparse_policy_node.core.transformer import CA
from sparse_policy_node.core.transformer import DPTransformer
from sparse_policy_node.core.transformer import FFN
from sparse_policy_node.core.transformer import memory_mask
from sparse_policy_node.core.transformer import SA
import torch
from torch import nn


def make_model(tiny_config):
    torch.manual_seed(0)
    t = tiny_config.transformer
    return DPTransformer(t, tiny_config.obs.obs_feature_dim).eval(), t


def test_forward_shapes(tiny_config):
    model, t = make_model(tiny_config)
    B = 3
    x = torch.randn(B, t.horizon, t.action_dim)
    cond = torch.randn(B, t.n_obs_steps, tiny_config.obs.obs_feature_dim)
    eps = model(x, torch.tensor([0, 5, 19]), cond)
    assert eps.shape == (B, t.horizon, t.action_dim)
    assert model.num_units == 3 * t.n_layer
    assert model.encode_condition(torch.tensor([1, 2, 3]), cond).shape == \
        (B, 1 + t.n_obs_steps, t.n_emb)


def test_dense_forward_is_the_composition_of_units_bit_for_bit(tiny_config):
    model, t = make_model(tiny_config)
    x_a = torch.randn(2, t.horizon, t.action_dim)
    cond = torch.randn(2, t.n_obs_steps, tiny_config.obs.obs_feature_dim)
    ts = torch.tensor([7, 7])
    with torch.no_grad():
        expected = model(x_a, ts, cond)
        memory = model.encode_condition(ts, cond)
        x = model.embed_sample(x_a)
        for layer in range(t.n_layer):
            for kind in (SA, CA, FFN):
                x = x + model.unit(layer, kind, x, memory)
        composed = model.output(x)
        kv_all = model.memory_kv_all_steps(*model.encode_condition_parts(ts[:1], cond))
        stepped = dense_step(model, x_a, kv_all, 0)
    assert torch.equal(composed, expected)
    # Batched memory and K/V (all steps at once) agree with the per-step forward to rounding.
    assert torch.allclose(stepped, expected, atol=1e-6)


def test_batched_condition_encoding_matches_per_step_memory(tiny_config):
    model, t = make_model(tiny_config)
    cond = torch.randn(2, t.n_obs_steps, tiny_config.obs.obs_feature_dim)
    steps = torch.tensor([19, 12, 3, 0])
    with torch.no_grad():
        all_steps = model.encode_condition_all_steps(steps, cond)
        for k, step in enumerate(steps):
            per_step = model.encode_condition(step.expand(2), cond)
            assert torch.allclose(all_steps[:, k], per_step, atol=1e-6)


def test_memory_mask_follows_diffusion_policy():
    m = memory_mask(4, 3)
    visible = m == 0
    # Action i sees cond token s iff i >= s - 1: time token always, obs j from action j on.
    assert visible[:, 0].all()
    assert visible[0].tolist() == [True, True, False]
    assert visible[1].tolist() == [True, True, True]


def test_matches_torch_transformer_decoder_with_the_same_weights(tiny_config):
    """Our units reproduce nn.TransformerDecoderLayer(norm_first, GELU) loaded with our weights.

    This is the layer Diffusion Policy uses, so DP checkpoints keep their meaning.
    """
    model, t = make_model(tiny_config)
    layer = nn.TransformerDecoderLayer(t.n_emb, t.n_head, 4 * t.n_emb, dropout=0.0,
                                       activation='gelu', batch_first=True, norm_first=True)
    ref = nn.TransformerDecoder(layer, t.n_layer).eval()
    state = {k.replace('layers.', 'layers.', 1): v for k, v in model.state_dict().items()
             if k.startswith('layers.')}
    ref.load_state_dict(state)
    x_a = torch.randn(2, t.horizon, t.action_dim)
    cond = torch.randn(2, t.n_obs_steps, tiny_config.obs.obs_feature_dim)
    ts = torch.tensor([3, 11])
    with torch.no_grad():
        memory = model.encode_condition(ts, cond)
        x = model.embed_sample(x_a)
        out_ref = model.output(ref(x, memory, tgt_mask=model.mask,
                                   memory_mask=model.memory_mask))
        out = model(x_a, ts, cond)
    assert torch.allclose(out, out_ref, atol=1e-5)


def test_determinism_with_injected_noise(tiny_policy):
    obs = make_obs(tiny_policy)
    t = tiny_policy.config.transformer
    K = tiny_policy.scheduler.num_steps
    noise = torch.randn(1, t.horizon, t.action_dim)
    step_noise = torch.randn(K, 1, t.horizon, t.action_dim)
    a = tiny_policy.predict_action(obs, noise=noise, step_noise=step_noise)
    b = tiny_policy.predict_action(obs, noise=noise, step_noise=step_noise)
    assert torch.equal(a['action_pred'], b['action_pred'])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(tiny_policy.predict_action(obs, generator=g1)['action'],
                       tiny_policy.predict_action(obs, generator=g2)['action'])
    assert a['action'].shape == (1, tiny_policy.config.n_action_steps, t.action_dim)
    assert torch.equal(a['action'], a['action_pred'][:, t.n_obs_steps - 1:
                                                     t.n_obs_steps - 1 +
                                                     tiny_policy.config.n_action_steps])


def test_dropout_applies_in_training_only(tiny_config):
    """The hot paths skip nn.Dropout outside training; in training every unit still drops."""
    import dataclasses
    t = dataclasses.replace(tiny_config.transformer, p_drop_attn=0.5, p_drop_emb=0.5)
    torch.manual_seed(0)
    model = DPTransformer(t, tiny_config.obs.obs_feature_dim)
    x = torch.randn(2, t.horizon, t.action_dim)
    cond = torch.randn(2, t.n_obs_steps, tiny_config.obs.obs_feature_dim)
    steps = torch.tensor([3, 7])
    model.train()
    assert not torch.equal(model(x, steps, cond), model(x, steps, cond))
    h = torch.randn(2, t.horizon, t.n_emb)
    layer = model.layers[0]
    for branch in (lambda: layer.sa(h, model.mask), lambda: layer.ffn(h),
                   lambda: model.embed_sample(x)):
        assert not torch.equal(branch(), branch())
    model.eval()
    assert torch.equal(model(x, steps, cond), model(x, steps, cond))
