"""Video decoding, uniform sampling, preprocessing and the generated clip's temporal structure."""

from __future__ import annotations

import pytest
import torch

from tokcomp.errors import InputError
from tokcomp.video import generate_video, read_video, uniform_frame_indices, video_size, write_video


def test_uniform_sampling_includes_first_and_last_frame():
    assert uniform_frame_indices(10, 4) == [0, 3, 6, 9]
    with pytest.raises(InputError, match="fewer than the 12 requested"):
        uniform_frame_indices(10, 12)


def test_generated_video_has_static_shots_separated_by_cuts():
    clip, cuts = generate_video(length=30, height=48, width=48, shots=3, motion=0.0, noise=0.0, seed=0)
    assert clip.shape == (30, 48, 48, 3) and clip.dtype == torch.uint8 and cuts == [0, 10, 20]
    assert torch.equal(clip[3], clip[7])  # no motion, no noise: identical frames within a shot
    assert not torch.equal(clip[9], clip[10])  # a cut changes the scene


def test_generated_video_is_reproducible_by_seed():
    a, _ = generate_video(length=8, height=32, width=32, seed=5)
    b, _ = generate_video(length=8, height=32, width=32, seed=5)
    c, _ = generate_video(length=8, height=32, width=32, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_decoded_file_returns_requested_frames(tmp_path):
    clip, _ = generate_video(length=20, height=64, width=64, seed=0)
    path = tmp_path / "clip.mp4"
    write_video(path, clip)
    frames = read_video(path, 5)
    assert frames.shape == (5, 64, 64, 3) and frames.dtype == torch.uint8
    assert (frames[0].float() - clip[0].float()).abs().mean() < 12  # lossy codec, same picture


def test_missing_corrupt_and_short_videos_name_the_problem(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_video(tmp_path / "none.mp4", 4)
    with pytest.raises(InputError, match="is a directory, not a video file"):
        read_video(tmp_path, 4)
    with pytest.raises(InputError, match="is a directory"):
        video_size(tmp_path)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video" * 50)
    with pytest.raises(InputError, match="cannot be decoded"):
        read_video(bad, 4)
    clip, _ = generate_video(length=6, height=32, width=32)
    short = tmp_path / "short.mp4"
    write_video(short, clip)
    with pytest.raises(InputError, match="fewer than the 32 requested"):
        read_video(short, 32)


def test_preprocess_resizes_and_normalises_like_siglip(tiny):
    frames = torch.full((2, 50, 70, 3), 255, dtype=torch.uint8)
    video = tiny.preprocess(frames)
    size = tiny.config.vision_config.image_size
    x = video.pixels
    assert x.shape == (2, 3, size, size)
    torch.testing.assert_close(x, torch.ones_like(x))
    assert (video.frames, video.rows) == (2, 2) and video.row_frames == [[0], [1]]
    assert video.grid == tiny.info.vision_grid and video.llm_grid == tiny.info.pooled_grid
