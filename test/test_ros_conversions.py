"""Round trips of the pure message conversions (cv_bridge style); no node needed."""

from geometry_msgs.msg import PoseStamped
import numpy as np
import pytest
from sensor_msgs.msg import Image
from sensor_msgs.msg import JointState
from sparse_policy_node.ros import conversions as conv


def rgb(h=6, w=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8'])
def test_color_round_trip(encoding):
    img = rgb()
    msg = conv.rgb_to_image(img, encoding)
    assert msg.encoding == encoding and msg.step == 15 and len(msg.data) == 90
    np.testing.assert_array_equal(conv.image_to_rgb(msg), img)


def test_chw_input_and_mono8_replicates_gray():
    img = rgb()
    np.testing.assert_array_equal(conv.image_to_rgb(conv.rgb_to_image(img.transpose(2, 0, 1))),
                                  img)
    gray = conv.image_to_rgb(conv.rgb_to_image(img, 'mono8'))
    assert gray.shape == (6, 5, 3)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_row_padding_is_skipped():
    img = rgb()
    padded = np.zeros((6, 16), dtype=np.uint8)
    padded[:, :15] = img.reshape(6, 15)
    msg = Image(height=6, width=5, encoding='rgb8', step=16, data=padded.tobytes())
    np.testing.assert_array_equal(conv.image_to_rgb(msg), img)


def test_resize_to_model_size_in_chw():
    msg = conv.rgb_to_image(rgb(64, 48))
    chw = conv.image_to_chw(msg, (32, 32))
    assert chw.shape == (3, 32, 32) and chw.dtype == np.uint8
    uniform = conv.rgb_to_image(np.full((64, 48, 3), 77, dtype=np.uint8))
    assert (conv.image_to_chw(uniform, (32, 32)) == 77).all()


@pytest.mark.parametrize('msg, match', [
    (Image(height=2, width=2, encoding='16UC1', step=4, data=bytes(8)), 'unsupported'),
    (Image(height=2, width=2, encoding='rgb8', step=6, data=bytes(5)), 'expected step'),
    (Image(height=0, width=0, encoding='rgb8', step=0, data=b''), 'empty'),
    (Image(height=2, width=2, encoding='rgb8', step=6, data=b''), 'expected step'),
    (Image(height=2, width=4, encoding='rgb8', step=6, data=bytes(12)), 'smaller than'),
])
def test_bad_images_raise_with_reason(msg, match):
    with pytest.raises(conv.ConversionError, match=match):
        conv.image_to_rgb(msg)


def test_lowdim_map_grammar():
    sources = conv.parse_lowdim_map([
        'eef=pose:ee_pose:position', 'quat=pose:ee_pose:orientation',
        'fingers=joint_state:joint_states:position:b,a'])
    assert [s.dim for s in sources] == [3, 4, 2]
    assert sources[2].names == ('b', 'a') and sources[2].topic == 'joint_states'
    for bad in (['eef'], ['eef=pose:ee_pose:wrench'], ['q=joint_state:js:position:'],
                ['a=pose:p:position', 'a=pose:p:orientation']):
        with pytest.raises(conv.ConversionError):
            conv.parse_lowdim_map(bad)


def test_joint_state_by_name_and_defects():
    msg = JointState(name=['a', 'b', 'c'], position=[1.0, 2.0, 3.0])
    np.testing.assert_array_equal(conv.joint_state_to_vector(msg, ['c', 'a']), [3.0, 1.0])
    with pytest.raises(conv.ConversionError, match='lacks'):
        conv.joint_state_to_vector(msg, ['z'])
    with pytest.raises(conv.ConversionError, match='names but'):
        conv.joint_state_to_vector(JointState(name=['a', 'b'], position=[1.0]), ['a'])
    with pytest.raises(conv.ConversionError, match='NaN'):
        conv.joint_state_to_vector(JointState(name=['a'], position=[float('nan')]), ['a'])


def test_pose_parts_and_non_finite():
    msg = PoseStamped()
    msg.pose.position.x, msg.pose.orientation.w = 1.5, 1.0
    np.testing.assert_array_equal(conv.pose_to_vector(msg, 'position'), [1.5, 0, 0])
    np.testing.assert_array_equal(conv.pose_to_vector(msg, 'orientation'), [0, 0, 0, 1])
    assert conv.pose_to_vector(msg, 'pose').shape == (7,)
    msg.pose.position.y = float('inf')
    with pytest.raises(conv.ConversionError, match='NaN or inf'):
        conv.pose_to_vector(msg, 'position')


def test_trajectory_round_trip_and_clamp():
    actions = np.linspace(-2, 2, 12).reshape(4, 3)
    clamped = conv.clamp_actions(actions, conv.broadcast_limits([-1.0], 3, 'lo'),
                                 conv.broadcast_limits([1.0, 1.0, 0.5], 3, 'hi'))
    assert clamped.min() == -1.0 and clamped[:, 2].max() == 0.5
    msg = conv.chunk_to_trajectory(clamped, ['x', 'y', 'z'], 50_000_000,
                                   conv.ns_to_stamp(12_345_000_000))
    stamp, offsets, back = conv.trajectory_to_chunk(msg)
    assert stamp == 12_345_000_000 and offsets == [0, 50_000_000, 100_000_000, 150_000_000]
    np.testing.assert_allclose(back, clamped)
    with pytest.raises(conv.ConversionError, match='NaN'):
        conv.clamp_actions(np.array([[np.nan, 0, 0]]), -1, 1)
    with pytest.raises(conv.ConversionError, match='1 or 3'):
        conv.broadcast_limits([1.0, 2.0], 3, 'action.upper')


def test_cover_crop_keeps_the_aspect_ratio_and_flip_turns_the_image_over():
    # A 40x80 (H x W) image whose outer quarters are white: cover_crop to 32x32 keeps the
    # centre 40x40 (black), squash keeps the white sides.
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, :20] = img[:, 60:] = 255
    msg = conv.rgb_to_image(img)
    assert conv.image_to_chw(msg, (32, 32), 'cover_crop').max() == 0
    assert conv.image_to_chw(msg, (32, 32)).max() == 255
    top = np.zeros((32, 32, 3), np.uint8)
    top[:8] = 200                                   # a bright band at the top
    flipped = conv.image_to_chw(conv.rgb_to_image(top), (32, 32), flip_vertical=True)
    assert (flipped[:, -8:] == 200).all() and (flipped[:, :8] == 0).all()
    with pytest.raises(conv.ConversionError, match='resize mode'):
        conv.image_to_chw(msg, (32, 32), 'stretch')
