"""lokr_diffusers.training.data: folders and captions, the transform, datasets, collate, synthetic data."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from PIL import Image

from lokr_diffusers.training.data import (
    CaptionedImageDataset,
    DreamBoothDataset,
    center_crop_top_left,
    collate,
    image_transform,
    image_transform_with_coords,
    load_image_folder,
    make_synthetic_dataset,
    open_image,
)


def _save(path: str, size: tuple[int, int] = (40, 30), color: tuple[int, int, int] = (255, 0, 0)) -> str:
    """An RGB image of (w, h) `size`, left half `color`, right half its inverse (so flips show)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.new("RGB", size, color)
    image.paste(tuple(255 - c for c in color), (size[0] // 2, 0, size[0], size[1]))
    image.save(path)
    return path


def _gradient(w: int, h: int) -> Image.Image:
    """Every pixel different: R follows x, G follows y, so any crop offset or flip changes the tensor."""
    return Image.merge("RGB", [Image.linear_gradient("L").rotate(90).resize((w, h)),
                               Image.linear_gradient("L").resize((w, h)), Image.new("L", (w, h), 128)])


# ----------------------------------------------------------------------------------------------- folders

def test_metadata_jsonl_captions(tmp_path):
    d = str(tmp_path)
    for name in ("b.png", "a.jpg", "sub/c.webp"):
        _save(os.path.join(d, name))
    rows = [{"file_name": "b.png", "text": "bee"}, {"file_name": "a.jpg", "text": "ay"},
            {"file_name": "sub/c.webp", "text": "see", "other": 1}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pairs = load_image_folder(d)
    assert [(os.path.relpath(p, d).replace(os.sep, "/"), c) for p, c in pairs] == [
        ("a.jpg", "ay"), ("b.png", "bee"), ("sub/c.webp", "see")]
    assert load_image_folder(d) == pairs  # deterministic


def test_metadata_custom_columns_and_txt_fallback(tmp_path):
    d = str(tmp_path)
    _save(os.path.join(d, "x.png"))
    _save(os.path.join(d, "y.png"))
    (tmp_path / "y.txt").write_text("  from txt \n")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"image": "x.png", "caption": ["first", "second"]}))
    pairs = load_image_folder(d, caption_column="caption", image_column="image")
    assert [c for _, c in pairs] == ["first", "from txt"]


def test_txt_captions_and_empty(tmp_path):
    d = str(tmp_path)
    for name in ("img1.PNG", "img2.jpeg", "img3.bmp"):
        _save(os.path.join(d, name))
    (tmp_path / "img1.txt").write_text("a photo of sks dog\n")
    (tmp_path / "img2.txt").write_text("a painting")
    (tmp_path / "notes.md").write_text("not an image")
    pairs = load_image_folder(d)
    assert [(os.path.basename(p), c) for p, c in pairs] == [
        ("img1.PNG", "a photo of sks dog"), ("img2.jpeg", "a painting"), ("img3.bmp", "")]


@pytest.mark.parametrize("case, error, match", [
    ("missing_folder", FileNotFoundError, "not found"),
    ("no_images", ValueError, "no images"),
    ("missing_file", FileNotFoundError, "line 2.*gone.png"),
    ("bad_json", ValueError, "line 1.*JSON"),
    ("missing_key", ValueError, "line 1.*'text'"),
    ("duplicate", ValueError, "twice"),
])
def test_folder_errors(tmp_path, case, error, match):
    d = str(tmp_path / "data")
    meta = {
        "missing_file": [json.dumps({"file_name": "a.png", "text": "ok"}), json.dumps({"file_name": "gone.png",
                                                                                       "text": "x"})],
        "bad_json": ["{not json"],
        "missing_key": [json.dumps({"file_name": "a.png"})],
        "duplicate": [json.dumps({"file_name": "a.png", "text": "x"})] * 2,
    }
    if case != "missing_folder":
        os.makedirs(d)
    if case not in ("missing_folder", "no_images"):
        _save(os.path.join(d, "a.png"))
        with open(os.path.join(d, "metadata.jsonl"), "w") as fh:
            fh.write("\n".join(meta[case]))
    if case == "no_images":
        (tmp_path / "data" / "readme.txt").write_text("nothing here")
    with pytest.raises(error, match=match):
        load_image_folder(d)


# --------------------------------------------------------------------------------------------- transform

def test_transform_shape_range_dtype():
    t = image_transform(32, center_crop=False, random_flip=True)
    x = t(_gradient(50, 40), torch.Generator().manual_seed(0))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.min() < -0.5 and x.max() > 0.5  # the full range is used, not [0, 1]
    # exact values: black -> -1, white -> +1, through RGBA and L inputs too
    assert torch.equal(t(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), None), -torch.ones(3, 32, 32))
    assert torch.equal(t(Image.new("L", (64, 32), 255), None), torch.ones(3, 32, 32))


def test_transform_deterministic_per_seed_and_random_across_seeds():
    t = image_transform_with_coords(32, center_crop=False, random_flip=True)
    image = _gradient(64, 48)  # resized to (h, w) = (32, 42): 11 possible x offsets
    a = t(image, torch.Generator().manual_seed(7))
    b = t(image, torch.Generator().manual_seed(7))
    assert torch.equal(a.pixel_values, b.pixel_values) and a.crop_top_left == b.crop_top_left
    outs = [t(image, torch.Generator().manual_seed(s)) for s in range(12)]
    assert len({o.crop_top_left for o in outs}) > 1  # crops differ
    flipped = [o.pixel_values[0, 0, 0] > o.pixel_values[0, 0, -1] for o in outs]  # R falls left to right
    assert any(flipped) and not all(flipped)  # some flipped, some not


def test_flip_mirrors_the_image():
    image = _gradient(32, 32)
    t = image_transform(32, center_crop=True, random_flip=True)
    outs = [t(image, torch.Generator().manual_seed(s)) for s in range(10)]
    plain = image_transform(32, center_crop=True)(image, None)
    assert all(torch.equal(o, plain) or torch.equal(o, plain.flip(-1)) for o in outs)
    assert any(torch.equal(o, plain.flip(-1)) for o in outs)


def test_resize_keeps_aspect_then_crops_square():
    # 100 x 60 (w x h) -> shorter side 30 -> (h, w) = (30, int(30 * 100 / 60)) = (30, 50), then 30 x 30.
    image = _gradient(100, 60)
    out = image_transform_with_coords(30, center_crop=True)(image, None)
    assert out.pixel_values.shape == (3, 30, 30)
    assert out.original_size == (60, 100)
    assert out.crop_top_left == (0, 10)  # (50 - 30) / 2
    # The crop equals the same window of the aspect-kept resize (not a squash of the whole image).
    resized = image.resize((50, 30), Image.Resampling.BILINEAR)
    expect = torch.tensor(list(resized.crop((10, 0, 40, 30)).getdata()), dtype=torch.float32)
    expect = (expect / 127.5 - 1.0).T.reshape(3, 30, 30)
    assert torch.allclose(out.pixel_values, expect)
    # Portrait: the longer side is the height.
    tall = image_transform_with_coords(30, center_crop=True)(_gradient(60, 100), None)
    assert tall.original_size == (100, 60) and tall.crop_top_left == (10, 0)


@pytest.mark.parametrize("w, h, res, expect", [
    (100, 60, 30, (0, 10)),  # resized (h, w) = (30, 50): x = (50 - 30) / 2 = 10
    (64, 64, 32, (0, 0)),    # square: no offset
    (45, 30, 20, (0, 5)),    # resized (20, 30): x = 5
    (30, 47, 20, (6, 0)),    # resized (int(20 * 47 / 30), 20) = (31, 20): y = round(5.5) = 6
    (20, 29, 20, (4, 0)),    # resized (29, 20): y = round(4.5) = 4 (Python's / torchvision's half-to-even)
])
def test_center_crop_coordinates(w, h, res, expect):
    out = image_transform_with_coords(res, center_crop=True)(_gradient(w, h), None)
    assert out.crop_top_left == expect
    assert out.original_size == (h, w)
    assert out.pixel_values.shape == (3, res, res)


def test_center_crop_top_left_helper():
    assert center_crop_top_left(31, 20, 20) == (6, 0)
    assert center_crop_top_left(30, 50, 30) == (0, 10)


def test_random_crop_coords_match_pixels():
    """The reported (y, x) is where the pixels came from (what SDXL's time ids need)."""
    image = _gradient(80, 40)  # resized (h, w) = (20, 40)
    t = image_transform_with_coords(20, center_crop=False, random_flip=False)
    ref = image_transform(20, center_crop=True)  # crop at x = 10
    resized = image.resize((40, 20), Image.Resampling.BILINEAR)
    for s in range(5):
        out = t(image, torch.Generator().manual_seed(s))
        y, x = out.crop_top_left
        assert y == 0 and 0 <= x <= 20
        window = torch.tensor(list(resized.crop((x, 0, x + 20, 20)).getdata()), dtype=torch.float32)
        assert torch.allclose(out.pixel_values, (window / 127.5 - 1.0).T.reshape(3, 20, 20))
    assert ref(image, None).shape == (3, 20, 20)


def test_open_image_sources(tmp_path):
    path = _save(str(tmp_path / "a.png"))
    raw = (tmp_path / "a.png").read_bytes()
    ims = [open_image(path), open_image(tmp_path / "a.png"), open_image({"bytes": raw, "path": None}),
           open_image({"bytes": None, "path": path}), open_image(Image.open(path))]
    assert all(list(im.getdata()) == list(ims[0].getdata()) for im in ims)
    with pytest.raises(TypeError):
        open_image(3)


# ---------------------------------------------------------------------------------------------- datasets

def _folder(tmp_path, name: str, n: int, size: tuple[int, int] = (48, 32)) -> list[tuple[str, str]]:
    for k in range(n):
        _save(str(tmp_path / name / f"{k}.png"), size, color=(40 * k % 256, 100, 200))
    return load_image_folder(str(tmp_path / name))


def test_captioned_dataset_items_and_epoch_reproducibility(tmp_path):
    pairs = [(p, f"caption {k}") for k, (p, _) in enumerate(_folder(tmp_path, "d", 3))]
    ds = CaptionedImageDataset(pairs, 16, random_flip=True, seed=3)
    item = ds[1]
    assert set(item) == {"pixel_values", "caption", "original_size", "crop_top_left"}
    assert item["pixel_values"].shape == (3, 16, 16) and item["caption"] == "caption 1"
    assert item["original_size"] == (32, 48)
    assert torch.equal(ds[-2]["pixel_values"], item["pixel_values"])  # negative index = same item, same seed

    def epoch(d, e):
        d.set_epoch(e)
        return [(d[i]["pixel_values"], d[i]["crop_top_left"]) for i in range(len(d))]

    e0, e1 = epoch(ds, 0), epoch(ds, 1)
    again = CaptionedImageDataset(pairs, 16, random_flip=True, seed=3)
    for (a, ca), (b, cb) in zip(epoch(again, 1), e1, strict=True):  # fresh dataset, straight to epoch 1
        assert torch.equal(a, b) and ca == cb
    for (a, ca), (b, cb) in zip(epoch(ds, 0), e0, strict=True):  # going back to epoch 0
        assert torch.equal(a, b) and ca == cb

    def differ(x, y):
        return any(ca != cb or not torch.equal(a, b) for (a, ca), (b, cb) in zip(x, y, strict=True))

    assert differ(e0, e1)  # the epoch changes the crops/flips
    assert differ(e0, epoch(CaptionedImageDataset(pairs, 16, random_flip=True, seed=4), 0))  # so does the seed
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(ValueError):
        CaptionedImageDataset([], 16)


def test_dreambooth_lengths_and_prior_items(tmp_path):
    inst = _folder(tmp_path, "inst", 2)
    cls = _folder(tmp_path, "cls", 5, size=(32, 48))
    plain = DreamBoothDataset(inst, "a photo of sks dog", resolution=16)
    assert len(plain) == 2 and set(plain[0]) == {"instance"}
    assert plain[1]["instance"]["prompt"] == "a photo of sks dog"

    prior = DreamBoothDataset(inst, "a photo of sks dog", cls, "a photo of dog", 16, center_crop=True)
    assert len(prior) == 5
    item = prior[4]
    assert set(item) == {"instance", "class"}
    assert item["class"]["prompt"] == "a photo of dog" and item["class"]["original_size"] == (48, 32)
    assert item["instance"]["original_size"] == (32, 48)
    # instance image 4 % 2 == 0, class image 4 (center crop: no randomness)
    assert torch.equal(item["instance"]["pixel_values"], prior[0]["instance"]["pixel_values"])
    assert not torch.equal(item["class"]["pixel_values"], prior[0]["class"]["pixel_values"])
    assert len(DreamBoothDataset(cls, "p", inst, "q", 16)) == 5
    with pytest.raises(ValueError):
        DreamBoothDataset(inst, "p", cls, None, 16)
    with pytest.raises(ValueError):
        DreamBoothDataset([], "p", resolution=16)


def test_collate_shapes(tmp_path):
    pairs = _folder(tmp_path, "d", 3)
    ds = CaptionedImageDataset(pairs, 16)
    batch = collate([ds[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    assert batch["caption"] == ["", "", ""]
    assert batch["original_size"] == [(32, 48)] * 3 and len(batch["crop_top_left"]) == 3

    db = DreamBoothDataset(pairs[:2], "inst", pairs, "cls", 16)
    batch = collate([db[0], db[1]])
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    assert batch["caption"] == ["inst", "inst", "cls", "cls"]  # instance half, then class half
    batch = collate([DreamBoothDataset(pairs, "inst", resolution=16)[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["caption"] == ["inst"] * 3
    with pytest.raises(ValueError):
        collate([])


# ------------------------------------------------------------------------------------------ synthetic data

def test_synthetic_dataset_deterministic_and_loadable(tmp_path):
    t0 = time.perf_counter()
    a = make_synthetic_dataset(str(tmp_path / "a"), n=8, size=64, seed=0)
    elapsed = time.perf_counter() - t0
    b = make_synthetic_dataset(str(tmp_path / "b"), n=8, size=64, seed=0)
    c = make_synthetic_dataset(str(tmp_path / "c"), n=8, size=64, seed=1)
    assert elapsed < 0.2
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b)) and len([n for n in names if n.endswith(".png")]) == 8
    for n in names:
        with open(os.path.join(a, n), "rb") as fa, open(os.path.join(b, n), "rb") as fb:
            assert fa.read() == fb.read()
    with open(os.path.join(a, "0000.png"), "rb") as fa, open(os.path.join(c, "0000.png"), "rb") as fc:
        assert fa.read() != fc.read()  # the seed matters
    pairs = load_image_folder(a)
    assert len(pairs) == 8 and all(cap == "a photo of sks shape" for _, cap in pairs)
    image = open_image(pairs[0][0])
    assert image.size == (64, 64)
    colors = {rgb for _, rgb in image.getcolors(64 * 64)}
    assert (30, 60, 200) in colors and (220, 30, 30) in colors  # blue background, red shape
    batch = collate([CaptionedImageDataset(pairs, 32)[i] for i in range(2)])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
