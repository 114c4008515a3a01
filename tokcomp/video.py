"""Video input: decode files with PyAV and sample frames uniformly, or generate a synthetic clip.

The generated clip has known temporal structure so temporal merging has something real to find:
``shots`` scenes separated by hard cuts, each a static textured background with ``objects``
moving at ``motion`` pixels per frame, plus sensor noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tokcomp.errors import InputError


def uniform_frame_indices(total: int, count: int) -> list[int]:
    """``count`` indices spread uniformly over ``range(total)``, first and last included (as LLaVA samples)."""
    if count > total:
        raise InputError(f"the video has {total} frames, fewer than the {count} requested (input.frames)")
    if count <= 0:
        raise InputError(f"input.frames must be positive, got {count}")
    return np.linspace(0, total - 1, count).round().astype(int).tolist()


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise InputError(f"video file {str(path)!r} is a directory, not a video file")
    if not path.is_file():
        raise InputError(f"video file {str(path)!r} does not exist")


def read_video(path: str | Path, frames: int) -> Tensor:
    """Decode ``path`` and return ``frames`` uniformly sampled RGB frames, uint8 (T, H, W, 3)."""
    import av

    path = Path(path)
    _check_file(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"video file {str(path)!r} has no video stream")
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except InputError:
        raise
    except Exception as exc:  # PyAV raises many error types for corrupt input
        raise InputError(f"video file {str(path)!r} cannot be decoded: {exc}") from exc
    if not decoded:
        raise InputError(f"video file {str(path)!r} contains no decodable frames")
    picked = uniform_frame_indices(len(decoded), frames)
    return torch.from_numpy(np.stack([decoded[i] for i in picked]))


def _smooth_texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A colourful low-frequency background: random blobs upsampled, so neighbouring patches correlate."""
    coarse = rng.uniform(0, 255, size=(3, max(2, height // 16), max(2, width // 16))).astype(np.float32)
    x = torch.from_numpy(coarse)[None]
    x = torch.nn.functional.interpolate(x, size=(height, width), mode="bicubic", align_corners=False)[0]
    return x.permute(1, 2, 0).numpy()


def generate_video(length: int = 96, height: int = 128, width: int = 128, shots: int = 3, objects: int = 3,
                   motion: float = 1.5, noise: float = 2.0, seed: int = 0) -> tuple[Tensor, list[int]]:
    """A synthetic clip (uint8 (length, H, W, 3)) and the first frame index of each shot."""
    for name, value in (("length", length), ("height", height), ("width", width), ("shots", shots)):
        if value <= 0:
            raise InputError(f"input.generated.{name} must be positive, got {value}")
    if shots > length:
        raise InputError(f"input.generated.shots={shots} exceeds input.generated.length={length}")
    rng = np.random.default_rng(seed)
    cuts = np.linspace(0, length, shots + 1).round().astype(int)
    video = np.empty((length, height, width, 3), dtype=np.float32)
    yy, xx = np.mgrid[0:height, 0:width]
    for s in range(shots):
        background = _smooth_texture(rng, height, width)
        size = rng.uniform(0.08, 0.2, size=objects) * min(height, width)
        pos = rng.uniform(0, 1, size=(objects, 2)) * (height, width)
        angle = rng.uniform(0, 2 * np.pi, size=objects)
        velocity = motion * np.stack([np.sin(angle), np.cos(angle)], axis=1)
        colour = rng.uniform(0, 255, size=(objects, 3))
        for t in range(cuts[s], cuts[s + 1]):
            frame = background.copy()
            for o in range(objects):
                cy, cx = (pos[o] + velocity[o] * (t - cuts[s])) % (height, width)
                inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= size[o] ** 2
                frame[inside] = colour[o]
            video[t] = frame + rng.normal(0, noise, size=frame.shape) if noise > 0 else frame
    return torch.from_numpy(np.clip(video, 0, 255).astype(np.uint8)), cuts[:-1].tolist()


def video_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of a video file's stream, without decoding it all."""
    import av

    _check_file(Path(path))
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            return stream.codec_context.height, stream.codec_context.width
    except Exception as exc:  # PyAV raises many error types for corrupt input
        raise InputError(f"video file {str(path)!r} cannot be read: {exc}") from exc


def sampled_fps(path: str | Path, frames: int) -> float | None:
    """Frames per second of ``frames`` frames sampled uniformly over the file's duration (M-RoPE models
    space time by it); None when the container does not say how long the video is."""
    import av

    _check_file(Path(path))
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            if stream.duration is not None and stream.time_base is not None:
                seconds = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                seconds = container.duration / av.time_base
            else:
                return None
    except Exception as exc:  # PyAV raises many error types for corrupt input
        raise InputError(f"video file {str(path)!r} cannot be read: {exc}") from exc
    return frames / seconds if seconds > 0 else None


def load_frames(input_cfg) -> Tensor:
    """Frames for an experiment's ``input`` section: the video file if given, else the generated clip."""
    if input_cfg.video:
        return read_video(input_cfg.video, input_cfg.frames)
    g = input_cfg.generated
    clip, _ = generate_video(g.length, g.height, g.width, g.shots, g.objects, g.motion, g.noise, g.seed)
    return clip[uniform_frame_indices(clip.shape[0], input_cfg.frames)]


def write_video(path: str | Path, frames: Tensor, fps: int = 24) -> None:
    """Encode uint8 (T, H, W, 3) frames as an H.264 mp4 (for tests and for exporting the generated clip)."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        for frame in frames.numpy():
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
