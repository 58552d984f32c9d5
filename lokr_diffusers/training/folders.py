"""Image folders with captions, checked before training starts.

Captions: `metadata.jsonl` (the diffusers / HF `imagefolder` convention), else a `.txt` beside each image.
Policy for bad input, chosen so that a long run never dies at step 10,000 on an input it could have
refused at step 0, and a few bad files among many good ones do not stop a run:
- a folder that is missing or holds no images: error naming the folder (and the argument);
- metadata.jsonl that is not UTF-8, not JSON, or names a missing file: error naming file and line;
- images that cannot be decoded (corrupt, truncated, unreadable, dangling links): each one is opened and
  decoded up front; when some are good, the bad ones are skipped with a warning naming them; when none
  is good, an error names them;
- a `.txt` caption that is not UTF-8 is read with replacement characters and a warning naming it;
- text-to-image data where no image has a caption: error (`require_captions`) saying how to caption;
- images of any PIL mode (L, LA, P, RGBA, CMYK, 16-bit) are fine; very elongated images get a warning,
  as the square crop keeps a small part of them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from PIL import Image

from .errors import InputNotFoundError, TrainingInputError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
ELONGATED = 4.0  # aspect ratio above which the square crop keeps under a quarter of the image: warn
HOW_TO_CAPTION = (f"add a {METADATA_FILE} with one JSON object per line, e.g. "
                  '{"file_name": "0001.png", "text": "a photo of sks dog"}, or a .txt file with the '
                  "caption beside each image (0001.png -> 0001.txt)")


def caption_text(value: Any, where: str) -> str:
    """A caption as a string: str as is, None as "", a list of strings as its first (as diffusers does
    outside training's random pick, kept deterministic here)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return value[0]
    raise TrainingInputError(f"{where}: caption must be a string or a list of strings, got {type(value).__name__}")


def _metadata_row(line: bytes, where: str, caption_column: str, image_column: str) -> dict[str, Any] | None:
    try:
        text = line.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TrainingInputError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start}); save the file "
                                 "as UTF-8") from e
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise TrainingInputError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from e
    if not isinstance(row, dict) or image_column not in row or caption_column not in row:
        raise TrainingInputError(f"{where}: expected a JSON object with keys {image_column!r} and {caption_column!r}")
    return row


def read_metadata(folder: str, caption_column: str, image_column: str, clips: bool = False) -> dict[str, str]:
    """{relative posix path: caption} from `metadata.jsonl` (empty when there is none). `clips`: a row may name a
    folder (a clip's frames, training/clips.py) as well as a file."""
    path = os.path.join(folder, METADATA_FILE)
    if not os.path.isfile(path):
        return {}
    captions: dict[str, str] = {}
    with open(path, "rb") as fh:
        for n, line in enumerate(fh, start=1):
            where = f"{path}, line {n}"
            row = _metadata_row(line, where, caption_column, image_column)
            if row is None:
                continue
            rel = os.path.normpath(str(row[image_column])).replace(os.sep, "/")
            if not (os.path.exists if clips else os.path.isfile)(os.path.join(folder, rel)):
                raise InputNotFoundError(f"{where}: {image_column}={row[image_column]!r} names a missing "
                                         f"{'clip' if clips else 'file'}")
            if rel in captions:
                raise TrainingInputError(f"{where}: {rel!r} is listed twice")
            captions[rel] = caption_text(row[caption_column], where)
    return captions


def _image_files(folder: str) -> list[str]:
    """Relative posix paths of the images under `folder` (recursive, hidden folders skipped)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if f.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/"))
    return found


def txt_caption(path: str) -> str:
    """The caption in the `.txt` beside `path` (same stem), "" when there is none."""
    txt = os.path.splitext(path)[0] + ".txt"
    if not os.path.isfile(txt):
        return ""
    with open(txt, "rb") as fh:
        data = fh.read()
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        logger.warning("%s is not UTF-8 (%s at byte %d); reading it with replacement characters: save it as "
                       "UTF-8 to keep every character", txt, e.reason, e.start)
        return data.decode("utf-8", errors="replace").strip()


def load_image_folder(folder: str, caption_column: str = "text", image_column: str = "file_name",
                      argument: str = "image folder") -> list[tuple[str, str]]:
    """(image path, caption) pairs of an image folder, sorted by relative path.

    Each image's caption comes from `metadata.jsonl` (one JSON object per line with `image_column` and
    `caption_column`), else from a `.txt` file beside it with the same stem, else "". `argument` names
    the folder in messages (e.g. "--train_data_dir"). Raises InputNotFoundError (a FileNotFoundError)
    for a missing folder or a metadata line naming a missing file, TrainingInputError (a ValueError)
    for a folder without images or a malformed metadata line. Images are not opened here (see
    `check_images`).
    """
    if not os.path.isdir(folder):
        what = "is a file, not a folder" if os.path.exists(folder) else "not found"
        raise InputNotFoundError(f"{argument} {folder!r}: {what}; give the folder that holds the images")
    captions = read_metadata(folder, caption_column, image_column)
    files = sorted(set(_image_files(folder)) | set(captions))
    if not files:
        raise TrainingInputError(f"{argument} {folder!r}: no images ({', '.join(IMAGE_EXTENSIONS)}) in it or "
                                 "its sub-folders; put the training images there")
    unlisted = [f for f in files if f not in captions]
    if captions and unlisted:
        logger.warning("%d image(s) in %s are not in %s; using .txt captions or '' for them (first: %s)",
                       len(unlisted), folder, METADATA_FILE, unlisted[0])
    pairs = []
    for rel in files:
        path = os.path.join(folder, *rel.split("/"))
        pairs.append((path, captions[rel] if rel in captions else txt_caption(path)))
    logger.info("%s: %d images, %d with captions", folder, len(pairs), sum(bool(c) for _, c in pairs))
    return pairs


def image_problem(path: str) -> str | None:
    """Why the image file at `path` cannot be used for training, or None: it is opened and decoded
    (JPEGs at reduced scale, which still reads all their data)."""
    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                image.draft("RGB", (64, 64))
            image.load()
            w, h = image.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return f"{type(e).__name__}: {e}"
    return None if w > 0 and h > 0 else f"empty image ({w}x{h})"


def _elongated(path: str) -> bool:
    with Image.open(path) as image:
        w, h = image.size
    return max(w, h) > ELONGATED * min(w, h)


def check_images(pairs: Sequence[tuple[Any, str]], argument: str) -> list[tuple[Any, str]]:
    """The pairs whose image decodes. Bad files among good ones are skipped with a warning naming
    them; when no image is good, TrainingInputError names them. Non-path sources (PIL images, `datasets`
    rows) are kept as they are."""
    bad = [(src, why) for src, _ in pairs if isinstance(src, (str, os.PathLike))
           for why in [image_problem(os.fspath(src))] if why is not None]
    if bad and len(bad) == len(pairs):
        listed = "; ".join(f"{src}: {why}" for src, why in bad[:5]) + ("; ..." if len(bad) > 5 else "")
        raise TrainingInputError(f"{argument}: none of the {len(pairs)} image(s) can be read ({listed}); replace "
                                 "or re-export them (PNG or JPEG)")
    if bad:
        logger.warning("%s: skipping %d unreadable image(s) of %d: %s", argument, len(bad), len(pairs),
                       "; ".join(f"{src} ({why})" for src, why in bad))
    skipped = {os.fspath(src) for src, _ in bad}
    good = [(src, cap) for src, cap in pairs if not (isinstance(src, (str, os.PathLike)) and os.fspath(src) in skipped)]
    long = [os.fspath(src) for src, _ in good if isinstance(src, (str, os.PathLike)) and _elongated(os.fspath(src))]
    if long:
        logger.warning("%s: %d image(s) have an aspect ratio over %g:1 and the square crop keeps only part of "
                       "them (first: %s)", argument, len(long), ELONGATED, long[0])
    return good


def require_captions(pairs: Sequence[tuple[Any, str]], where: str, how: str = HOW_TO_CAPTION) -> None:
    """TrainingInputError when no pair has a caption (text-to-image would learn from empty prompts),
    saying `how` to caption; a warning when some lack one."""
    empty = sum(not c.strip() for _, c in pairs)
    if empty == len(pairs):
        raise TrainingInputError(f"{where}: none of the {len(pairs)} image(s) has a caption; {how}")
    if empty:
        logger.warning("%s: %d of %d image(s) have no caption and train with an empty prompt", where, empty,
                       len(pairs))
