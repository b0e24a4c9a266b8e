"""Tests for fatezero_fast.video: loading, saving, sampling, cropping, and input errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from fatezero_fast.errors import InputError
from fatezero_fast.io.video import (
    check_writable,
    load_video,
    make_sample_clip,
    save_frames,
    save_masks,
    save_video,
    side_by_side,
)


def index_color(index):
    """Gray level that encodes a frame index (robust to JPEG/GIF/MP4 loss)."""
    return 10 + 20 * index


def decode_indices(video):
    """Recover the encoded frame index of each frame of a (F, 3, H, W) tensor in [-1, 1]."""
    levels = (video.mean(dim=(1, 2, 3)) + 1) * 127.5
    return [round((level - 10) / 20) for level in levels.tolist()]


def write_frames(folder, count, ext="png", size=(32, 24), names=None):
    """Write `count` uniform frames whose gray level encodes their index."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        name = names[index] if names else f"{index:03d}.{ext}"
        image = np.full((size[1], size[0], 3), index_color(index), dtype=np.uint8)
        Image.fromarray(image).save(folder / name)
    return folder


def smooth_clip(frames=8, height=64, width=96):
    """A smooth moving gradient in [-1, 1]: compresses well in lossy formats."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    clip = [
        torch.stack([0.8 * torch.sin(2 * x + t / 3), 0.6 * y, 0.5 * torch.cos(x + y + t / 4)])
        for t in range(frames)
    ]
    return torch.stack(clip)


def assert_input_error(call, *fragments):
    """Assert the call raises InputError with a one-line message containing the fragments."""
    with pytest.raises(InputError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message.strip()
    for fragment in fragments:
        assert fragment in message
    return message


# ----------------------------------------------------------------------------- round trips
def test_mp4_round_trip(tmp_path):
    clip = smooth_clip()
    path = save_video(clip, tmp_path / "clip.mp4", fps=8)
    loaded = load_video(path, n_sample_frame=-1, width=96, height=64)
    assert loaded.shape == (8, 3, 64, 96) and loaded.dtype == torch.float32
    assert loaded.min() >= -1 and loaded.max() <= 1
    assert (loaded - clip).abs().mean() < 0.1


def test_gif_round_trip_and_loops(tmp_path):
    clip = smooth_clip(frames=4)
    path = save_video(clip, tmp_path / "clip.gif", fps=4)
    with Image.open(path) as image:
        assert image.info["loop"] == 0
    loaded = load_video(path, n_sample_frame=4, width=96, height=64)
    assert loaded.shape == (4, 3, 64, 96)
    assert loaded.min() >= -1 and loaded.max() <= 1
    assert (loaded - clip).abs().mean() < 0.1


def test_save_video_accepts_uint8_array(tmp_path):
    frames = np.zeros((3, 16, 24, 3), dtype=np.uint8)
    frames[..., 0] = 255
    loaded = load_video(save_video(frames, tmp_path / "red.mp4"), n_sample_frame=3, width=24, height=16)
    assert torch.allclose(loaded.mean(dim=(0, 2, 3)), torch.tensor([1.0, -1.0, -1.0]), atol=0.1)


@pytest.mark.parametrize("ext", ["png", "jpg", "jpeg"])
def test_frame_folder_in_name_order(tmp_path, ext):
    folder = write_frames(tmp_path / "frames", 5, ext=ext)
    (folder / "notes.txt").write_text("ignored")
    loaded = load_video(folder, n_sample_frame=-1, width=32, height=24)
    assert loaded.shape == (5, 3, 24, 32)
    assert decode_indices(loaded) == [0, 1, 2, 3, 4]


def test_frame_folder_sorted_by_file_name_not_creation_order(tmp_path):
    names = ["c.png", "a.png", "b.png"]  # written in this order, with indices 0, 1, 2
    folder = write_frames(tmp_path / "frames", 3, names=names)
    assert decode_indices(load_video(folder, n_sample_frame=3, width=32, height=24)) == [1, 2, 0]


# ----------------------------------------------------------------------------- sampling
@pytest.mark.parametrize(
    "n_sample_frame, sampling_rate, start_sample_frame, expected",
    [
        (3, 1, 0, [0, 1, 2]),
        (3, 2, 1, [1, 3, 5]),
        (2, 3, 4, [4, 7]),
        (-1, 3, 0, [0, 3, 6, 9]),
        (-1, 1, 8, [8, 9]),
    ],
)
def test_frame_selection(tmp_path, n_sample_frame, sampling_rate, start_sample_frame, expected):
    folder = write_frames(tmp_path / "frames", 10)
    loaded = load_video(
        folder,
        n_sample_frame=n_sample_frame,
        sampling_rate=sampling_rate,
        start_sample_frame=start_sample_frame,
        width=32,
        height=24,
    )
    assert decode_indices(loaded) == expected


def test_frame_selection_from_mp4(tmp_path):
    frames = np.stack([np.full((16, 16, 3), index_color(i), dtype=np.uint8) for i in range(8)])
    path = save_video(frames, tmp_path / "levels.mp4")
    loaded = load_video(path, n_sample_frame=3, sampling_rate=2, start_sample_frame=1, width=16, height=16)
    assert decode_indices(loaded) == [1, 3, 5]


# ----------------------------------------------------------------------------- crop and resize
def position_frame(width, height):
    """A frame whose red channel encodes x and green channel encodes y."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[..., 0] = np.arange(width)[None, :] * 10
    image[..., 1] = np.arange(height)[:, None] * 10
    image[..., 2] = 128
    return image


def write_image(folder, image):
    """Write a single-frame folder."""
    folder.mkdir()
    Image.fromarray(image).save(folder / "0.png")
    return folder


def to_float(image):
    """uint8 (H, W, 3) array -> (3, H, W) float tensor in [-1, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1


def test_offset_crop_exact_pixels(tmp_path):
    image = position_frame(24, 20)
    folder = write_image(tmp_path / "frames", image)
    offset = {"left": 3, "right": 5, "top": 1, "bottom": 3}
    loaded = load_video(folder, n_sample_frame=1, offset=offset, width=16, height=16)
    assert torch.equal(loaded[0], to_float(image[1:17, 3:19]))


def test_offset_clipped_like_official_code(tmp_path):
    image = position_frame(24, 20)
    folder = write_image(tmp_path / "frames", image)
    offset = {"left": 100, "right": 100, "top": 100, "bottom": 100}  # leaves the pixel (x=23, y=19)
    loaded = load_video(folder, n_sample_frame=1, offset=offset, width=8, height=8)
    assert torch.allclose(loaded[0], to_float(image[19:20, 23:24]).expand(3, 8, 8))


def test_non_square_output_shape(tmp_path):
    folder = write_frames(tmp_path / "frames", 2, size=(120, 80))
    loaded = load_video(folder, n_sample_frame=2, width=96, height=64)
    assert loaded.shape == (2, 3, 64, 96)


def test_resize_covers_then_center_crops(tmp_path):
    # 160x80 source: red | blue | green thirds of widths 40/80/40. Covering 64x64 scales by 0.8
    # to 128x64 and the center crop keeps only the blue middle.
    image = np.zeros((80, 160, 3), dtype=np.uint8)
    image[:, :40, 0] = 255
    image[:, 40:120, 2] = 255
    image[:, 120:, 1] = 255
    folder = write_image(tmp_path / "frames", image)
    loaded = load_video(folder, n_sample_frame=1, width=64, height=64)
    assert loaded.shape == (1, 3, 64, 64)
    blue = torch.tensor([-1.0, -1.0, 1.0])[:, None, None]
    assert torch.allclose(loaded[0, :, :, 1:-1], blue.expand(3, 64, 62), atol=1e-4)


# ----------------------------------------------------------------------------- outputs
def test_side_by_side():
    source, edited = -torch.ones(2, 3, 8, 16), torch.ones(2, 3, 8, 16)
    joined = side_by_side(source, edited)
    assert joined.shape == (2, 3, 8, 32)
    assert torch.equal(joined[..., :16], source) and torch.equal(joined[..., 16:], edited)


def test_save_frames_names(tmp_path):
    paths = save_frames(smooth_clip(frames=3, height=16, width=24), tmp_path / "out")
    assert [p.name for p in paths] == ["0000.png", "0001.png", "0002.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0000.png", "0001.png", "0002.png"]
    with Image.open(paths[0]) as image:
        assert image.size == (24, 16)


def test_save_masks_per_frame(tmp_path):
    masks = torch.zeros(2, 8, 16)
    masks[1, :, 8:] = 1
    path = save_masks(masks, tmp_path / "masks.png")
    with Image.open(path) as image:
        assert image.mode == "L" and image.size == (2 * 128 + 2, 64)  # short side 8 -> 64, a 2-pixel line
        pixels = np.asarray(image)
    assert pixels[:, :128].max() == 0 and pixels[:, 128:130].min() == 128
    assert pixels[:, 130:194].max() == 0 and pixels[:, 194:].min() == 255


def test_save_masks_per_step_is_one_picture(tmp_path):
    masks = np.zeros((2, 3, 64, 64))
    masks[1, 2] = 1
    path = save_masks(masks, tmp_path / "masks.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks.png"]
    with Image.open(path) as image:
        assert image.size == (3 * 66 - 2, 2 * 66 - 2)  # a column per frame, a row per step
        pixels = np.asarray(image)
    assert pixels[66:, 132:].min() == 255 and pixels[:64, :64].max() == 0


def test_sample_clip_is_deterministic_and_moves():
    clip = make_sample_clip(num_frames=4, width=128, height=64)
    assert clip.shape == (4, 3, 64, 128) and clip.dtype == torch.float32
    assert clip.min() >= -1 and clip.max() <= 1
    assert torch.equal(clip, make_sample_clip(num_frames=4, width=128, height=64))
    # The car is the red stuff; its center of mass moves right from frame to frame.
    red = (clip[:, 0] > 0.4) & (clip[:, 1] < -0.5) & (clip[:, 2] < -0.5)
    columns = torch.arange(128, dtype=torch.float32)
    centers = [(red[f].float().sum(0) * columns).sum() / red[f].sum() for f in range(4)]
    assert all(red[f].sum() > 50 for f in range(4))
    assert all(later > earlier + 5 for earlier, later in zip(centers, centers[1:]))


def test_check_writable_accepts_new_folder(tmp_path):
    check_writable(tmp_path / "new" / "nested")
    check_writable(tmp_path / "new" / "video.mp4")


# ----------------------------------------------------------------------------- bad input
def test_missing_path(tmp_path):
    assert_input_error(lambda: load_video(tmp_path / "nope.mp4"), "video not found", "nope.mp4")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no frames here")
    assert_input_error(lambda: load_video(tmp_path / "empty"), "no PNG/JPG frames")


def test_frames_of_different_sizes(tmp_path):
    folder = write_frames(tmp_path / "frames", 2, size=(32, 24))
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(folder / "005.png")
    assert_input_error(lambda: load_video(folder, n_sample_frame=1), "000.png is 32x24", "005.png is 30x20")


@pytest.mark.parametrize("size, fragment", [((500, 512), "width 500 is not a multiple of 8: use e.g. 496 or 504"),
                                             ((512, 100), "height 100 is not a multiple of 8"),
                                             ((0, 512), "width 0")])
def test_size_not_multiple_of_8(tmp_path, size, fragment):
    folder = write_frames(tmp_path / "frames", 1)
    assert_input_error(lambda: load_video(folder, n_sample_frame=1, width=size[0], height=size[1]), fragment)


def test_corrupt_video_file(tmp_path):
    path = tmp_path / "x.mp4"
    path.write_bytes(b"this is not a video" * 50)
    assert_input_error(lambda: load_video(path), "cannot read video", "x.mp4")


def test_corrupt_gif_file(tmp_path):
    path = tmp_path / "x.gif"
    path.write_bytes(b"GIF89a garbage")
    assert_input_error(lambda: load_video(path), "cannot read video", "x.gif")


def test_corrupt_frame_in_folder(tmp_path):
    folder = write_frames(tmp_path / "frames", 2)
    (folder / "001.png").write_bytes(b"not a png")
    assert_input_error(lambda: load_video(folder, n_sample_frame=2), "cannot read frame", "001.png")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "clip.avi"
    path.write_bytes(b"\0" * 16)
    assert_input_error(lambda: load_video(path), "unsupported video format '.avi'")


def test_too_few_frames(tmp_path):
    folder = write_frames(tmp_path / "frames", 3)
    assert_input_error(lambda: load_video(folder, n_sample_frame=8), "has 3 frames but 8 are needed")
    assert_input_error(lambda: load_video(folder, n_sample_frame=2, sampling_rate=3), "has 3 frames but 4 are needed")
    assert_input_error(lambda: load_video(folder, n_sample_frame=-1, start_sample_frame=3), "has 3 frames")


def test_unknown_offset_key(tmp_path):
    folder = write_frames(tmp_path / "frames", 1)
    assert_input_error(lambda: load_video(folder, n_sample_frame=1, offset={"lft": 2}), "unknown offset key(s) lft")


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a regular file")
    assert_input_error(lambda: check_writable(blocker / "out"), "not writable", "choose another --output")
    clip = smooth_clip(frames=2, height=16, width=16)
    assert_input_error(lambda: save_video(clip, blocker / "out" / "edit.mp4"), "not writable")
    assert_input_error(lambda: save_frames(clip, blocker / "out"), "not writable")
    assert_input_error(lambda: save_masks(torch.zeros(2, 8, 8), blocker / "out.png"), "not writable")


def test_unsupported_output_extension(tmp_path):
    assert_input_error(lambda: save_video(smooth_clip(frames=2), tmp_path / "edit.avi"), "use a .mp4 or .gif")
