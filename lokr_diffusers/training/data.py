"""Training data: image sources (folders are read and checked in `folders`), the train-time
transform, datasets and collation.

The transform mirrors diffusers' training examples (torchvision `Resize` + `CenterCrop`/`RandomCrop`
+ `RandomHorizontalFlip` + `ToTensor` + `Normalize([0.5], [0.5])`) with PIL and torch only, and
reports what SDXL's micro-conditioning needs: the original (h, w) and the crop's top-left (y, x).
Random choices come from a `torch.Generator`; the datasets seed one per item from (seed, epoch,
index), so any item of any epoch can be rebuilt exactly, e.g. after resuming from a checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from PIL import Image, ImageDraw, ImageOps
from torch import Tensor

from .errors import TrainingInputError
from .folders import IMAGE_EXTENSIONS as IMAGE_EXTENSIONS  # re-exported: the folder readers' old home
from .folders import METADATA_FILE, caption_text
from .folders import load_image_folder as load_image_folder

logger = logging.getLogger(__name__)

# What a pair's image may be: a path, a PIL image, or a `datasets` undecoded image {"bytes", "path"}.
ImageSource = Any


@dataclass
class Example:
    image: Image.Image
    caption: str


class Transformed(NamedTuple):
    pixel_values: Tensor  # (3, resolution, resolution), float32 in [-1, 1]
    original_size: tuple[int, int]  # (h, w) of the image before resizing
    crop_top_left: tuple[int, int]  # (y, x) of the crop in the resized (and possibly flipped) image


# ---------------------------------------------------------------------------------------------- sources

def load_hf_dataset(dataset_name: str, dataset_config_name: str | None, split: str, image_column: str,
                    caption_column: str, cache_dir: str | None) -> list[tuple[Any, str]]:
    """(image, caption) pairs of a `datasets` dataset (hub name or local path). Images stay undecoded
    ({"bytes", "path"}) until the dataset item is read, so a large set is not held as pixels in memory."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("load_hf_dataset needs the `datasets` library: pip install datasets") from e
    ds = datasets.load_dataset(dataset_name, dataset_config_name, split=split, cache_dir=cache_dir)
    for col in (image_column, caption_column):
        if col not in ds.column_names:
            raise TrainingInputError(f"--dataset_name {dataset_name}: no column {col!r}; columns are "
                                     f"{ds.column_names} (choose with --image_column / --caption_column)")
    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    captions = [caption_text(c, f"{dataset_name} row {i}") for i, c in enumerate(ds[caption_column])]
    return list(zip(ds[image_column], captions, strict=True))


def open_image(source: ImageSource) -> Image.Image:
    """A loaded PIL image, upright (EXIF orientation applied), from a path, a PIL image or a
    `datasets` undecoded image dict."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, dict):
        data = source.get("bytes")
        image = Image.open(io.BytesIO(data) if data is not None else source["path"])
    elif isinstance(source, (str, os.PathLike)):
        image = Image.open(source)
    else:
        raise TypeError(f"cannot open an image from {type(source).__name__}")
    image.load()  # read now, so the file handle is released
    return ImageOps.exif_transpose(image) or image


# -------------------------------------------------------------------------------------------- transform

def resized_size(h: int, w: int, resolution: int) -> tuple[int, int]:
    """torchvision `Resize(int)`: the shorter side to `resolution`, the longer scaled and truncated."""
    if h <= w:
        return resolution, int(resolution * w / h)
    return int(resolution * h / w), resolution


def center_crop_top_left(h: int, w: int, resolution: int) -> tuple[int, int]:
    """torchvision `CenterCrop`'s (y, x) for an (h, w) image; also what diffusers' SDXL script reports."""
    return round((h - resolution) / 2.0), round((w - resolution) / 2.0)  # half-to-even, as torchvision


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB. 16/32-bit integer images ("I;16", "I") are scaled to 8 bits first:
    PIL's own conversion clips them (a 16-bit PNG would come out white)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        high = image.getextrema()[1]
        peak = 65535.0 if image.mode.startswith("I;16") or (isinstance(high, (int, float)) and high > 255) else 255.0
        image = image.convert("I").point(lambda v: v * (255.0 / peak)).convert("L")
    return image.convert("RGB")


def _to_tensor(image: Image.Image) -> Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1] (ToTensor then Normalize([0.5], [0.5]))."""
    w, h = image.size
    hwc = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(h, w, 3)
    return hwc.permute(2, 0, 1).float().div_(127.5).sub_(1.0).contiguous()


@dataclass(frozen=True)
class ImageTransform:
    """Resize (shorter side), flip, crop to a square, to tensor. Flip comes before crop, as in
    diffusers' SDXL script, so the reported (y, x) is in the image the crop was cut from.
    A plain (picklable) class rather than a closure, so DataLoader workers can use it."""

    resolution: int
    center_crop: bool = False
    random_flip: bool = False

    def __post_init__(self) -> None:
        if self.resolution <= 0:
            raise ValueError(f"resolution must be positive, got {self.resolution}")

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> Transformed:
        image = to_rgb(image)
        original = (image.height, image.width)
        h, w = resized_size(*original, self.resolution)
        image = image.resize((w, h), Image.Resampling.BILINEAR)  # PIL's bilinear is antialiased, as torchvision's
        # Draw order is fixed (flip, then y, then x) so a seeded generator always gives the same result.
        if self.random_flip and torch.rand(1, generator=generator).item() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.center_crop:
            y, x = center_crop_top_left(h, w, self.resolution)
        else:
            y = int(torch.randint(0, h - self.resolution + 1, (1,), generator=generator).item())
            x = int(torch.randint(0, w - self.resolution + 1, (1,), generator=generator).item())
        image = image.crop((x, y, x + self.resolution, y + self.resolution))
        return Transformed(_to_tensor(image), original, (y, x))


def image_transform_with_coords(resolution: int, center_crop: bool = False,
                                random_flip: bool = False) -> Callable[[Image.Image, torch.Generator | None],
                                                                       Transformed]:
    """The train-time transform, returning (pixel_values (3, R, R), original (h, w), crop (y, x))."""
    return ImageTransform(resolution, center_crop, random_flip)


def image_transform(resolution: int, center_crop: bool = False,
                    random_flip: bool = False) -> Callable[[Image.Image, torch.Generator | None], Tensor]:
    """The train-time transform: PIL image (+ generator) -> (3, R, R) float32 in [-1, 1]."""
    full = ImageTransform(resolution, center_crop, random_flip)

    def apply(image: Image.Image, generator: torch.Generator | None = None) -> Tensor:
        return full(image, generator).pixel_values

    return apply


def item_generator(seed: int, epoch: int, index: int, stream: int = 0) -> torch.Generator:
    """A generator for one item of one epoch. Hashed rather than summed so that nearby (seed, epoch,
    index) triples do not share seeds; `stream` separates e.g. DreamBooth's instance and class images."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}:{stream}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


# --------------------------------------------------------------------------------------------- datasets

class _EpochDataset(torch.utils.data.Dataset):
    """Shared by both datasets: the transform, the seed and the current epoch."""

    def __init__(self, resolution: int, center_crop: bool, random_flip: bool, seed: int) -> None:
        self.transform = ImageTransform(resolution, center_crop, random_flip)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Random crops/flips of the items read from now on are those of epoch `epoch`."""
        self.epoch = epoch

    def _entry(self, source: ImageSource, index: int, stream: int) -> dict[str, Any]:
        out = self.transform(open_image(source), item_generator(self.seed, self.epoch, index, stream))
        return {"pixel_values": out.pixel_values, "original_size": out.original_size,
                "crop_top_left": out.crop_top_left}


class CaptionedImageDataset(_EpochDataset):
    """(image, caption) pairs -> {"pixel_values" (3, R, R), "caption", "original_size" (h, w),
    "crop_top_left" (y, x)}. Images are opened when read, not up front."""

    def __init__(self, pairs: Sequence[tuple[ImageSource, str]], resolution: int, center_crop: bool = False,
                 random_flip: bool = False, seed: int = 0) -> None:
        super().__init__(resolution, center_crop, random_flip, seed)
        if not pairs:
            raise ValueError("CaptionedImageDataset: no (image, caption) pairs")
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = range(len(self.pairs))[i]  # IndexError out of range; negative i -> its positive twin (same seed)
        source, caption = self.pairs[i]
        return {**self._entry(source, i, stream=0), "caption": caption}


class DreamBoothDataset(_EpochDataset):
    """Instance images with one prompt, optionally class images with another (prior preservation).

    Item i -> {"instance": {...}} and, with class data, {"class": {...}}; each entry holds
    "pixel_values", "prompt", "original_size", "crop_top_left". Instance image i % n_instance and
    class image i % n_class, so the length is max(n_instance, n_class), as in diffusers' script.
    The pairs' own captions are ignored: the prompts are the point of DreamBooth.
    """

    def __init__(self, instance_pairs: Sequence[tuple[ImageSource, str]], instance_prompt: str,
                 class_pairs: Sequence[tuple[ImageSource, str]] | None = None, class_prompt: str | None = None,
                 resolution: int = 512, center_crop: bool = False, random_flip: bool = False,
                 seed: int = 0) -> None:
        super().__init__(resolution, center_crop, random_flip, seed)
        if not instance_pairs:
            raise ValueError("DreamBoothDataset: no instance images")
        if class_pairs is not None and (not class_pairs or class_prompt is None):
            raise ValueError("DreamBoothDataset: prior preservation needs class images and a class_prompt")
        self.instance_images = [src for src, _ in instance_pairs]
        self.instance_prompt = instance_prompt
        self.class_images = [src for src, _ in class_pairs] if class_pairs is not None else None
        self.class_prompt = class_prompt

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_images or ()))

    def __getitem__(self, i: int) -> dict[str, dict[str, Any]]:
        i = range(len(self))[i]
        item = {"instance": {**self._entry(self.instance_images[i % len(self.instance_images)], i, stream=0),
                             "prompt": self.instance_prompt}}
        if self.class_images is not None:
            item["class"] = {**self._entry(self.class_images[i % len(self.class_images)], i, stream=1),
                             "prompt": self.class_prompt}
        return item


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Items of either dataset -> {"pixel_values" (B, 3, R, R), "caption" [B], "original_size" [B],
    "crop_top_left" [B]}. DreamBooth items give their instance entries, then their class entries
    (the batch's two halves, as diffusers' prior-preservation loss expects)."""
    if not examples:
        raise ValueError("collate: no examples")
    if "instance" in examples[0]:
        examples = [ex["instance"] for ex in examples] + [ex["class"] for ex in examples if "class" in ex]
    return {
        "pixel_values": torch.stack([ex["pixel_values"] for ex in examples]).contiguous(),
        "caption": [ex["caption"] if "caption" in ex else ex["prompt"] for ex in examples],
        "original_size": [tuple(ex["original_size"]) for ex in examples],
        "crop_top_left": [tuple(ex["crop_top_left"]) for ex in examples],
    }


# ---------------------------------------------------------------------------------------- synthetic data

def make_synthetic_dataset(folder: str, n: int = 8, size: int = 64, seed: int = 0,
                           caption: str = "a photo of sks shape") -> str:
    """n PNGs of a red circle or square at a random place on a blue background, plus metadata.jsonl.
    Deterministic (same bytes for the same arguments) and quick; for the offline demo and the tests."""
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for k in range(n):
        image = Image.new("RGB", (size, size), (30, 60, 200))
        r = rng.randint(size // 8, size // 4)  # radius / half side
        cx, cy = rng.randint(r, size - 1 - r), rng.randint(r, size - 1 - r)
        box = (cx - r, cy - r, cx + r, cy + r)
        draw = ImageDraw.Draw(image)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=(220, 30, 30))
        name = f"{k:04d}.png"
        image.save(os.path.join(folder, name), format="PNG")
        lines.append(json.dumps({"file_name": name, "text": caption}))
    with open(os.path.join(folder, METADATA_FILE), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return folder
