"""Videos and frames on disk: MP4 (imageio + imageio-ffmpeg) and dependency-free PNG.

Every writer is atomic: the file (or the folder of frames) is written under a temporary name
beside its destination and renamed into place once complete, so an interrupted run never
leaves a truncated video behind.

Frames are (F, H, W, 3), either float in [0, 1] (clipped, then rounded to 8 bits) or uint8.
"""
from __future__ import annotations

import contextlib
import os
import struct
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np

from unlearn_jax.atomic import atomic_dir, atomic_file
from unlearn_jax.errors import UnlearnError


def to_uint8(frames) -> np.ndarray:
    """float frames in [0, 1] (clipped) or uint8 frames -> uint8, same shape."""
    a = np.asarray(frames)
    if a.dtype == np.uint8:
        return a
    if not np.issubdtype(a.dtype, np.floating) and a.dtype.name != "bfloat16":
        raise UnlearnError(f"frames must be float in [0, 1] or uint8, got dtype {a.dtype}")
    a = np.nan_to_num(np.asarray(a, np.float32), nan=0.0)
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _check_video(frames) -> np.ndarray:
    a = np.asarray(frames)
    if a.ndim != 4 or a.shape[-1] != 3 or 0 in a.shape:
        raise UnlearnError(f"a video must be (frames, height, width, 3) with no empty axis; got shape {a.shape}")
    return to_uint8(a)


# --------------------------------------------------------------------------------------------
# MP4
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_fork():
    """imageio starts ffmpeg with fork + exec; JAX warns about any fork in a multithreaded process,
    but the child runs no Python (it execs ffmpeg at once), so the warning does not apply."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        yield


def _imageio():
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (provides the ffmpeg binary)
    except ModuleNotFoundError as e:
        raise UnlearnError(f"writing MP4 needs imageio and imageio-ffmpeg ({e.name} is missing): "
                           "pip install imageio imageio-ffmpeg") from None
    return imageio


def write_mp4(path, frames, fps: float = 8, quality: float = 8.0) -> Path:
    """Writes (F, H, W, 3) frames as an H.264 MP4, atomically.

    `quality` is imageio's 0-10 scale (10 = best; diffusers' `export_to_video` uses 5). Frames
    keep their exact size: even sizes are written as yuv420p (playable everywhere), odd ones as
    yuv444p, never rescaled.
    """
    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise UnlearnError(f"{path}: the video file name must end in .mp4")
    if not (isinstance(fps, (int, float)) and not isinstance(fps, bool) and 0 < fps <= 1000):
        raise UnlearnError(f"fps = {fps!r} is invalid; expected a number in (0, 1000]")
    video = _check_video(frames)
    imageio = _imageio()
    _, h, w, _ = video.shape
    pix_fmt = "yuv420p" if h % 2 == 0 and w % 2 == 0 else "yuv444p"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=".mp4", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the video should be a normal file
    try:
        with _quiet_fork():
            writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=quality,
                                        pixelformat=pix_fmt, macro_block_size=1, ffmpeg_log_level="error")
            try:
                for frame in video:
                    writer.append_data(frame)
            finally:
                writer.close()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def read_mp4(path) -> np.ndarray:
    """(F, H, W, 3) uint8 frames of a video file."""
    path = Path(path)
    if not path.is_file():
        raise UnlearnError(f"{path}: no such video file")
    imageio = _imageio()
    try:
        with _quiet_fork():
            reader = imageio.get_reader(str(path), format="FFMPEG")
            try:
                frames = [np.asarray(f) for f in reader]
            finally:
                reader.close()
    except (OSError, RuntimeError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnlearnError(f"{path}: cannot read the video ({msg})") from None
    if not frames:
        raise UnlearnError(f"{path}: the video has no frames")
    return np.stack(frames).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# PNG (no imaging library needed)
# --------------------------------------------------------------------------------------------
def png_bytes(image) -> bytes:
    """An (H, W, 3) float [0, 1] or uint8 image as the bytes of an 8-bit RGB PNG."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 3 or 0 in img.shape:
        raise UnlearnError(f"an image must be (height, width, 3); got shape {img.shape}")
    img = np.ascontiguousarray(to_uint8(img))
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    return png + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def write_png(path, image) -> Path:
    """Writes an (H, W, 3) float [0, 1] (or uint8) image as an 8-bit PNG, atomically."""
    data = png_bytes(image)
    with atomic_file(path) as f:
        f.write(data)
    return Path(path)


def write_frames_png(folder, frames, *, overwrite: bool = False, flag: str = "overwrite=True") -> Path:
    """Writes every frame of an (F, H, W, 3) video as `folder/00000.png`, `00001.png`, ...

    The folder is written as a whole (temporary folder, then renamed) and is never left half-filled;
    with `overwrite` it replaces an earlier frames folder of ours, never a folder a user owns."""
    video = _check_video(frames)
    with atomic_dir(folder, overwrite, flag=flag) as tmp:
        for i, frame in enumerate(video):
            (tmp / f"{i:05d}.png").write_bytes(png_bytes(frame))
    return Path(folder)


__all__ = ["png_bytes", "read_mp4", "to_uint8", "write_frames_png", "write_mp4", "write_png"]
