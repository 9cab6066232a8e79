"""Frame features: each camera frame is encoded once, the chunk is the same as without reuse."""

import threading

from conftest import make_obs
import pytest
from sparse_policy_node.core import keys
from sparse_policy_node.core.config import RuntimeConfig
from sparse_policy_node.core.engine import SparseEngine
from sparse_policy_node.core.frame_cache import FrameFeatureCache
from sparse_policy_node.core.policy import ObservationError
import torch

DENSE = RuntimeConfig(sparsity_enabled=False, gate_source='dense', num_inference_steps=5)


def frames(policy, n, seed=0):
    """Return n random single-step observations, each key without the T_o axis."""
    return [{k: v[0, 0] for k, v in make_obs(policy, seed=seed + i).items()} for i in range(n)]


def window(stream, end, T_o):
    """Observation window of batch 1 made of frames end-T_o+1 .. end."""
    return {k: torch.stack([stream[i][k] for i in range(end - T_o + 1, end + 1)])[None]
            for k in stream[0]}


def ids(policy, end, T_o):
    """Return frame ids of that window, per camera."""
    cams = [keys.image_key(c) for c in policy.config.obs.vision.cameras]
    return {k: [('ep0', i) for i in range(end - T_o + 1, end + 1)] for k in cams}


def noise_for(policy, seed):
    """Return initial and per-step DDPM noise, so that two engines sample the same chunk."""
    g = torch.Generator().manual_seed(seed)
    shape = policy.action_shape(1)
    return {'noise': torch.randn(shape, generator=g),
            'step_noise': torch.randn(DENSE.num_inference_steps, *shape, generator=g)}


def test_per_camera_features_compose_to_the_batched_encoding(tiny_policy):
    obs = make_obs(tiny_policy, batch=2)
    enc = tiny_policy.obs_encoder
    per_frame = {}
    for cam in tiny_policy.config.obs.vision.cameras:
        key = keys.image_key(cam)
        per_frame[key] = torch.stack([torch.stack([
            enc.encode_camera(cam, obs[key][b, t][None])[0] for t in range(obs[key].shape[1])])
            for b in range(2)])  # (B, T_o, F)
    with torch.no_grad():
        torch.testing.assert_close(tiny_policy.encode_obs(obs, per_frame),
                                   tiny_policy.encode_obs(obs), rtol=1e-5, atol=1e-5)


def test_streaming_windows_encode_only_the_new_frame_and_match_full_encoding(tiny_policy):
    T_o = tiny_policy.config.transformer.n_obs_steps
    n_cams = len(tiny_policy.config.obs.vision.cameras)
    stream = frames(tiny_policy, T_o + 3)
    cached, plain = SparseEngine(tiny_policy, None, DENSE), SparseEngine(tiny_policy, None, DENSE)
    for end in range(T_o - 1, len(stream)):
        obs = window(stream, end, T_o)
        a = cached.predict_action(obs, **noise_for(tiny_policy, end),
                                  frame_ids=ids(tiny_policy, end, T_o))
        b = plain.predict_action(obs, **noise_for(tiny_policy, end))
        expected = n_cams * (T_o if end == T_o - 1 else 1)
        assert a['stats']['frames_encoded'] == expected
        assert b['stats']['frames_encoded'] == n_cams * T_o
        torch.testing.assert_close(a['action_pred'], b['action_pred'], rtol=1e-4, atol=1e-4)


def test_frames_encoded_on_arrival_take_the_encoder_off_the_chunk(tiny_policy):
    T_o = tiny_policy.config.transformer.n_obs_steps
    stream = frames(tiny_policy, T_o)
    engine, plain = SparseEngine(tiny_policy, None, DENSE), SparseEngine(tiny_policy, None, DENSE)
    frame_ids = ids(tiny_policy, T_o - 1, T_o)
    for key, names in frame_ids.items():
        for i, name in enumerate(names):
            engine.encode_frame(key, name, stream[i][key])
    obs = window(stream, T_o - 1, T_o)
    out = engine.predict_action(obs, **noise_for(tiny_policy, 0), frame_ids=frame_ids)
    ref = plain.predict_action(obs, **noise_for(tiny_policy, 0))
    assert out['stats']['frames_encoded'] == 0
    torch.testing.assert_close(out['action_pred'], ref['action_pred'], rtol=1e-4, atol=1e-4)


def test_repeated_frame_at_episode_start_is_encoded_once(tiny_policy):
    T_o = tiny_policy.config.transformer.n_obs_steps
    stream = frames(tiny_policy, 1)
    obs = {k: torch.stack([v] * T_o)[None] for k, v in stream[0].items()}
    cams = [keys.image_key(c) for c in tiny_policy.config.obs.vision.cameras]
    engine = SparseEngine(tiny_policy, None, DENSE)
    out = engine.predict_action(obs, frame_ids={k: [('ep0', 0)] * T_o for k in cams})
    assert out['stats']['frames_encoded'] == len(cams)


def test_reset_forgets_frames_because_ids_may_repeat_after_a_sim_reset(tiny_policy):
    key = keys.image_key(tiny_policy.config.obs.vision.cameras[0])
    engine = SparseEngine(tiny_policy, None, DENSE)
    engine.encode_frame(key, 7, frames(tiny_policy, 1)[0][key])
    assert engine.frames.get(key, 7) is not None
    engine.reset()
    assert engine.frames.get(key, 7) is None


def test_bad_frames_and_ids_are_rejected_with_a_reason(tiny_policy):
    T_o = tiny_policy.config.transformer.n_obs_steps
    key = keys.image_key(tiny_policy.config.obs.vision.cameras[0])
    engine = SparseEngine(tiny_policy, None, DENSE)
    image = frames(tiny_policy, 1)[0][key]
    with pytest.raises(ObservationError, match='not a camera'):
        engine.encode_frame('nope_image', 0, image)
    with pytest.raises(ObservationError, match='shape'):
        engine.encode_frame(key, 0, image[:, :-1])
    with pytest.raises(ObservationError, match='NaN'):
        engine.encode_frame(key, 0, torch.full(image.shape, float('nan')))
    obs = make_obs(tiny_policy)
    with pytest.raises(ObservationError, match='ids, expected'):
        engine.predict_action(obs, frame_ids={key: [0] * (T_o + 1)})
    with pytest.raises(ObservationError, match='not an image key'):
        engine.predict_action(obs, frame_ids={'robot0_eef_pos': [0] * T_o})
    with pytest.raises(ObservationError, match='batch of 1'):
        engine.predict_action(make_obs(tiny_policy, batch=2), frame_ids={key: [0] * T_o})
    assert len(engine.frames) == 0


def test_frame_cache_is_a_bounded_lru():
    cache = FrameFeatureCache(capacity=3)
    for i in range(5):
        cache.put('cam_image', i, torch.full((2,), float(i)))
    assert len(cache) == 3
    assert cache.get('cam_image', 0) is None and cache.get('cam_image', 1) is None
    assert cache.get('cam_image', 2) is not None  # now the most recently used
    cache.put('cam_image', 5, torch.zeros(2))
    assert cache.get('cam_image', 3) is None and cache.get('cam_image', 2) is not None
    with pytest.raises(ValueError, match='capacity'):
        FrameFeatureCache(0)


def test_encoding_frames_from_another_thread_while_chunks_run(tiny_policy):
    T_o = tiny_policy.config.transformer.n_obs_steps
    stream = frames(tiny_policy, T_o + 20)
    engine = SparseEngine(tiny_policy, None, DENSE)
    cams = [keys.image_key(c) for c in tiny_policy.config.obs.vision.cameras]
    errors = []

    def producer():
        try:
            for i, frame in enumerate(stream):
                for key in cams:
                    engine.encode_frame(key, ('ep0', i), frame[key])
        except Exception as exc:  # noqa: B902 - surfaced by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=producer)
    thread.start()
    for end in range(T_o - 1, len(stream)):
        out = engine.predict_action(window(stream, end, T_o), frame_ids=ids(tiny_policy, end, T_o))
        assert torch.isfinite(out['action']).all()
    thread.join()
    assert not errors


def test_a_frame_another_thread_is_encoding_is_waited_for_not_encoded_twice(tiny_policy):
    T_o = tiny_policy.config.transformer.n_obs_steps
    stream = frames(tiny_policy, T_o)
    engine, plain = SparseEngine(tiny_policy, None, DENSE), SparseEngine(tiny_policy, None, DENSE)
    frame_ids = ids(tiny_policy, T_o - 1, T_o)
    key = next(iter(frame_ids))
    newest = frame_ids[key][-1]
    assert engine.frames.claim(key, newest)  # "the frame encoder is on it"
    assert not engine.frames.claim(key, newest)
    features = tiny_policy.obs_encoder.encode_camera(key[:-len('_image')],
                                                     stream[-1][key][None])[0].detach()
    timer = threading.Timer(0.1, engine.frames.put, (key, newest, features))
    timer.start()
    obs = window(stream, T_o - 1, T_o)
    out = engine.predict_action(obs, **noise_for(tiny_policy, 0), frame_ids=frame_ids)
    timer.join()
    n_frames = sum(len(set(v)) for v in frame_ids.values())
    assert out['stats']['frames_encoded'] == n_frames - 1
    ref = plain.predict_action(obs, **noise_for(tiny_policy, 0))
    torch.testing.assert_close(out['action_pred'], ref['action_pred'], rtol=1e-4, atol=1e-4)


def test_an_abandoned_claim_is_encoded_by_the_chunk(tiny_policy):
    T_o = tiny_policy.config.transformer.n_obs_steps
    stream = frames(tiny_policy, T_o)
    engine = SparseEngine(tiny_policy, None, DENSE)
    frame_ids = ids(tiny_policy, T_o - 1, T_o)
    key = next(iter(frame_ids))
    assert engine.frames.claim(key, frame_ids[key][-1])
    threading.Timer(0.05, engine.frames.abandon, (key, frame_ids[key][-1])).start()
    out = engine.predict_action(window(stream, T_o - 1, T_o), frame_ids=frame_ids)
    assert out['stats']['frames_encoded'] == sum(len(set(v)) for v in frame_ids.values())
    assert engine.frames.get(key, frame_ids[key][-1]) is not None
