"""Video clips for the video families (Wan, LTX-Video, LTX-2, HunyuanVideo, HunyuanVideo 1.5): folders of clips with
captions, checked before training starts, read into (3, F, R, R) tensors by the image data's transform (data.py), the
same crop and flip on every frame.

A clip is
- a sub-folder of frames: its PNG / JPEG / WebP / BMP files in name order, one folder one clip;
- an animated GIF (.gif), decoded with PIL;
- a video file (.mp4, .webm, .mov, .mkv, .avi, .m4v), decoded with PyAV (`pip install "lokr-diffusers[video]"`) when
  it is installed: without it a video file is refused before training with a message naming the package;
- an image directly in the data folder: a clip of one frame (Wan trains stills as one-frame clips: --num_frames 1).
Captions as for images (folders.py): `metadata.jsonl` whose `file_name` names the clip (the file or the frame
folder, relative to the data folder), else a `.txt` beside it with its name (clip.gif -> clip.txt, frames/ ->
frames.txt), else "". Each clip is decoded up front; one that cannot be read or has fewer than --num_frames frames
is skipped with a warning (an error when no clip is left). From a longer clip the --num_frames window starts at a
random frame drawn from the item's generator (the middle one with --center_crop), so a resumed run reads the same.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image, ImageSequence

from .data import CaptionedImageDataset, DreamBoothDataset, ImageTransform, item_generator, to_rgb
from .errors import InputNotFoundError, TrainingInputError
from .folders import IMAGE_EXTENSIONS, read_metadata, require_captions, txt_caption

logger = logging.getLogger(__name__)

GIF_EXTENSIONS = (".gif",)
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v")
NEEDS_PYAV = ("decoding video files needs PyAV: `pip install av` (lokr-diffusers[video]; or give the clip as a folder "
              "of PNG frames or an animated GIF)")


# ------------------------------------------------------------------------------------------------- readers

def _frame_files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f)))


def _pyav() -> Any:
    try:
        return importlib.import_module("av")  # optional: only video files need it
    except ImportError as e:
        raise TrainingInputError(NEEDS_PYAV) from e


def _video_frames(path: str, start: int, count: int | None) -> list[Image.Image]:
    av = _pyav()
    frames: list[Image.Image] = []
    with av.open(path) as container:
        for k, frame in enumerate(container.decode(video=0)):
            if k >= start:
                frames.append(frame.to_image())
            if count is not None and len(frames) == count:
                break
    return frames


def read_frames(clip: str, start: int = 0, count: int | None = None) -> list[Image.Image]:
    """Frames start .. start + count − 1 (all from `start` when count is None) of a clip, as loaded RGB PIL images."""
    if os.path.isdir(clip):
        files = _frame_files(clip)
        files = files[start:] if count is None else files[start:start + count]
        out = []
        for f in files:
            with Image.open(f) as image:
                out.append(to_rgb(image))
        return out
    ext = os.path.splitext(clip)[1].lower()
    if ext in VIDEO_EXTENSIONS:
        return _video_frames(clip, start, count)
    with Image.open(clip) as image:  # a GIF (or a still image: one frame)
        frames = [to_rgb(f.copy()) for f in ImageSequence.Iterator(image)]
    return frames[start:] if count is None else frames[start:start + count]


def clip_length(clip: str) -> int:
    """Frames in a clip, every one decoded (a frame folder's files, a GIF's frames, a video's)."""
    if os.path.isdir(clip):
        return len(read_frames(clip))
    if os.path.splitext(clip)[1].lower() in VIDEO_EXTENSIONS:
        return len(_video_frames(clip, 0, None))
    with Image.open(clip) as image:
        n = 0
        for frame in ImageSequence.Iterator(image):
            frame.load()
            n += 1
    return n


def clip_problem(clip: str, num_frames: int) -> str | None:
    """Why the clip cannot train at `num_frames` frames, or None."""
    try:
        n = clip_length(clip)
    except TrainingInputError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        return f"{type(e).__name__}: {e}"
    return None if n >= num_frames else f"{n} frame(s), fewer than --num_frames {num_frames}"


# ------------------------------------------------------------------------------------------------- folders

def _clips_in(folder: str) -> list[str]:
    """Relative posix paths of the clips under `folder` (module docstring), hidden folders skipped."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(root, folder).replace(os.sep, "/")
        frames = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
        if rel == ".":
            found += frames  # stills: one-frame clips
        elif frames:
            found.append(rel)
        found += [f if rel == "." else f"{rel}/{f}" for f in files
                  if f.lower().endswith(GIF_EXTENSIONS + VIDEO_EXTENSIONS)]
    return sorted(found)


def load_clip_folder(folder: str, caption_column: str = "text", image_column: str = "file_name",
                     argument: str = "clip folder") -> list[tuple[str, str]]:
    """(clip path, caption) pairs of a folder of clips, sorted by relative path; clips are not decoded here."""
    if not os.path.isdir(folder):
        what = "is a file, not a folder" if os.path.exists(folder) else "not found"
        raise InputNotFoundError(f"{argument} {folder!r}: {what}; give the folder that holds the clips")
    captions = read_metadata(folder, caption_column, image_column, clips=True)
    clips = sorted(set(_clips_in(folder)) | set(captions))
    if not clips:
        raise TrainingInputError(f"{argument} {folder!r}: no clips in it (sub-folders of frames, "
                                 f"{', '.join(GIF_EXTENSIONS + VIDEO_EXTENSIONS)}); put the training clips there")
    pairs = []
    for rel in clips:
        path = os.path.join(folder, *rel.split("/"))
        caption = captions.get(rel)
        if caption is None:
            caption = txt_caption(path.rstrip("/\\") + ".txt") if os.path.isdir(path) else txt_caption(path)
        pairs.append((path, caption))
    logger.info("%s: %d clips, %d with captions", folder, len(pairs), sum(bool(c) for _, c in pairs))
    return pairs


def check_clips(pairs: Sequence[tuple[str, str]], num_frames: int, argument: str) -> list[tuple[str, str]]:
    """The pairs whose clip decodes and has at least `num_frames` frames; the others skipped with a warning, or a
    TrainingInputError naming them when none is left (a video file without PyAV: that message, once)."""
    videos = [c for c, _ in pairs if os.path.splitext(c)[1].lower() in VIDEO_EXTENSIONS]
    if videos and importlib.util.find_spec("av") is None:
        raise TrainingInputError(f"{argument}: {len(videos)} video file(s) (first: {videos[0]}); {NEEDS_PYAV}")
    bad = [(c, why) for c, _ in pairs for why in [clip_problem(c, num_frames)] if why is not None]
    if bad and len(bad) == len(pairs):
        listed = "; ".join(f"{c}: {why}" for c, why in bad[:5]) + ("; ..." if len(bad) > 5 else "")
        raise TrainingInputError(f"{argument}: none of the {len(pairs)} clip(s) can train at --num_frames "
                                 f"{num_frames} ({listed}); give longer clips or fewer --num_frames (a clip's "
                                 "frames go in a sub-folder of their own)")
    if bad:
        logger.warning("%s: skipping %d clip(s) of %d: %s", argument, len(bad), len(pairs),
                       "; ".join(f"{c} ({why})" for c, why in bad))
    skipped = {c for c, _ in bad}
    return [(c, cap) for c, cap in pairs if c not in skipped]


# ------------------------------------------------------------------------------------------------ datasets

def transform_clip(clip: str, num_frames: int, transform: ImageTransform, generator: torch.Generator
                   ) -> dict[str, Any]:
    """{"pixel_values" (3, F, R, R) in [-1, 1], "original_size" (h, w), "crop_top_left" (y, x)}: a window of
    `num_frames` frames, each through the image data's `transform` with the same draws (one seed for every frame: the
    same flip and crop; frames of another size than the first are resized to it first). The window's start is drawn
    first (the middle window with center_crop)."""
    length = len(_frame_files(clip)) if os.path.isdir(clip) else clip_length(clip)
    spare = length - num_frames
    if spare < 0:
        raise ValueError(f"{clip}: {length} frame(s), fewer than {num_frames}")
    start = spare // 2 if transform.center_crop else int(torch.randint(0, spare + 1, (1,), generator=generator).item())
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    frames = read_frames(clip, start, num_frames)
    size = frames[0].size
    outs = [transform(f if f.size == size else f.resize(size, Image.Resampling.BILINEAR),
                      torch.Generator().manual_seed(seed)) for f in frames]
    return {"pixel_values": torch.stack([o.pixel_values for o in outs], dim=1), "original_size": outs[0].original_size,
            "crop_top_left": outs[0].crop_top_left}


class _ClipEntries:
    """The image datasets' entries (data.py) read from clips: `num_frames` frames of the clip a pair names."""

    transform: ImageTransform
    seed: int
    epoch: int
    num_frames: int = 1

    def _entry(self, source: Any, index: int, stream: int) -> dict[str, Any]:
        return transform_clip(os.fspath(source), self.num_frames, self.transform,
                              item_generator(self.seed, self.epoch, index, stream))


class CaptionedClipDataset(_ClipEntries, CaptionedImageDataset):
    """(clip, caption) pairs -> {"pixel_values" (3, F, R, R), "caption", ...} (CaptionedImageDataset's items)."""

    def __init__(self, pairs: Sequence[tuple[str, str]], resolution: int, num_frames: int, center_crop: bool = False,
                 random_flip: bool = False, seed: int = 0) -> None:
        CaptionedImageDataset.__init__(self, pairs, resolution, center_crop, random_flip, seed)
        self.num_frames = num_frames


class DreamBoothClipDataset(_ClipEntries, DreamBoothDataset):
    """Instance clips with one prompt (and class clips with another): DreamBoothDataset's items, of clips."""

    def __init__(self, instance_pairs: Sequence[tuple[str, str]], instance_prompt: str, num_frames: int,
                 class_pairs: Sequence[tuple[str, str]] | None = None, class_prompt: str | None = None,
                 resolution: int = 512, center_crop: bool = False, random_flip: bool = False, seed: int = 0) -> None:
        DreamBoothDataset.__init__(self, instance_pairs, instance_prompt, class_pairs, class_prompt, resolution,
                                   center_crop, random_flip, seed)
        self.num_frames = num_frames


def fit_frames(num_frames: int, factor: int, title: str) -> int:
    """`num_frames` as the VAE takes it, 1 + k · factor: rounded down with a warning, as diffusers' pipelines do."""
    fitted = (num_frames - 1) // factor * factor + 1
    if fitted != num_frames:
        logger.warning("--num_frames %d: %s takes 1 + k * %d frames; training on %d", num_frames, title, factor,
                       fitted)
    return fitted


def build_clip_dataset(args: Any, factor: int, default_frames: int, title: str) -> Any:
    """The training dataset of a video family: the clip folders read and every clip decoded; args.num_frames set to
    the frames it trains on."""
    args.num_frames = fit_frames(getattr(args, "num_frames", None) or default_frames, factor, title)
    n = args.num_frames

    def folder(name: str) -> list[tuple[str, str]]:
        where = f"--{name} {getattr(args, name)}"
        return check_clips(load_clip_folder(getattr(args, name), argument=f"--{name}"), n, where)

    if args.dreambooth:
        cls = folder("class_data_dir") if args.with_prior_preservation else None
        return DreamBoothClipDataset(folder("instance_data_dir"), args.instance_prompt, n, cls, args.class_prompt,
                                     args.resolution, center_crop=args.center_crop, random_flip=args.random_flip,
                                     seed=args.seed)
    if not args.train_data_dir:
        raise TrainingInputError(f"--dataset_name: {title} trains on clips; give --train_data_dir, a folder of clips")
    pairs = folder("train_data_dir")
    require_captions(pairs, f"--train_data_dir {args.train_data_dir}")
    return CaptionedClipDataset(pairs, args.resolution, n, center_crop=args.center_crop, random_flip=args.random_flip,
                                seed=args.seed)
