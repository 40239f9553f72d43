"""Image data: scanning folders and zips, captions, skipping and reporting, prompts, buckets and crops."""

import io
import json
import random
import zipfile

import numpy as np
import pytest
from PIL import Image

from loraforge.data.images import (
    DataError,
    PromptBuilder,
    bucket_batches,
    make_buckets,
    nearest_bucket,
    resize_and_crop,
    scan_images,
)


def _png(size=(16, 16), colour=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else (*colour, 128)).save(buf, format="PNG")
    return buf.getvalue()


def _write(path, data: bytes | str):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)


def test_folder_with_captions_nested_and_problems_reported(tmp_path):
    good = _png()
    _write(tmp_path / "a.png", good)
    _write(tmp_path / "a.txt", "  a red\nsquare ")
    _write(tmp_path / "sub" / "deeper" / "b.jpg", b"")
    Image.new("RGB", (20, 16), (0, 90, 200)).save(tmp_path / "sub" / "deeper" / "b.jpg", format="JPEG")
    Image.new("RGB", (16, 16), (9, 9, 9)).save(tmp_path / "c.webp", format="WEBP")
    _write(tmp_path / "truncated.png", good[: len(good) // 2])
    _write(tmp_path / "garbage.jpg", b"this is not a jpeg at all")
    _write(tmp_path / "tiny.png", _png((4, 4)))
    _write(tmp_path / "notes.csv", "x,y\n")
    _write(tmp_path / "orphan.txt", "no image has this name")

    records, report = scan_images(tmp_path, min_size=8)

    assert sorted(r.name for r in records) == ["a.png", "c.webp", "sub/deeper/b.jpg"]
    captions = {r.name: r.caption for r in records}
    assert captions == {"a.png": "a red square", "c.webp": None, "sub/deeper/b.jpg": None}
    skipped = dict(report.skipped)
    assert set(skipped) == {"truncated.png", "garbage.jpg", "tiny.png", "notes.csv", "orphan.txt"}
    assert "truncated" in skipped["truncated.png"]
    assert "too small" in skipped["tiny.png"] and "4x4" in skipped["tiny.png"]
    assert "not an image" in skipped["notes.csv"]
    summary = report.summary()
    assert "3 usable image(s), 1 with a caption, 5 file(s) skipped" in summary
    for name in skipped:
        assert name in summary
    # Records read their pixels again on demand, as RGB.
    b = next(r for r in records if r.name.endswith("b.jpg"))
    assert b.size == (20, 16) and b.load().mode == "RGB" and b.load().size == (20, 16)


def test_strict_stops_and_names_every_problem(tmp_path):
    _write(tmp_path / "ok.png", _png())
    _write(tmp_path / "bad.png", b"\x89PNG broken")
    _write(tmp_path / "readme.md", "hello")
    with pytest.raises(DataError) as e:
        scan_images(tmp_path, strict=True)
    assert "bad.png" in str(e.value) and "readme.md" in str(e.value)
    records, _ = scan_images(tmp_path, strict=False)
    assert [r.name for r in records] == ["ok.png"]


def test_zero_usable_images_is_an_error_naming_the_files(tmp_path):
    _write(tmp_path / "notes.txt", "just text")
    _write(tmp_path / "broken.png", b"nope")
    with pytest.raises(DataError, match="no usable training image") as e:
        scan_images(tmp_path)
    assert "broken.png" in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no usable training image"):
        scan_images(empty)
    with pytest.raises(DataError, match="not found"):
        scan_images(tmp_path / "missing")


def test_zip_with_nested_folders_captions_and_metadata(tmp_path):
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("set/one.png", _png(colour=(10, 200, 10)))
        z.writestr("set/one.txt", "a green thing")
        z.writestr("set/deep/two.png", _png())
        z.writestr("set/deep/three.png", _png())
        z.writestr(
            "set/deep/metadata.jsonl",
            json.dumps({"file_name": "two.png", "text": "from jsonl"})
            + "\n"
            + json.dumps({"file_name": "three.png", "caption": "caption column"})
            + "\n",
        )
        z.writestr("set/broken.webp", b"RIFF....WEBP")
        z.writestr("__MACOSX/set/._one.png", b"apple double")
    records, report = scan_images(archive)
    captions = {r.name: r.caption for r in records}
    assert captions == {
        "set/one.png": "a green thing",
        "set/deep/two.png": "from jsonl",
        "set/deep/three.png": "caption column",
    }
    assert [n for n, _ in report.skipped] == ["set/broken.webp"]
    assert records[0].load().size == (16, 16)


def test_txt_caption_wins_over_metadata_and_bad_jsonl_lines_are_reported(tmp_path):
    _write(tmp_path / "x.png", _png())
    _write(tmp_path / "x.txt", "from txt")
    _write(tmp_path / "y.png", _png())
    _write(
        tmp_path / "metadata.jsonl",
        '{"file_name": "x.png", "text": "from jsonl"}\nnot json\n{"file_name": "y.png", "prompt": "p"}\n',
    )
    records, report = scan_images(tmp_path)
    assert {r.name: r.caption for r in records} == {"x.png": "from txt", "y.png": "p"}
    assert report.skipped and "metadata.jsonl:2" in report.skipped[0][0]
    with pytest.raises(DataError, match="metadata.jsonl"):
        scan_images(tmp_path, strict=True)


def test_transparent_images_become_rgb_on_white(tmp_path):
    _write(tmp_path / "alpha.png", _png(mode="RGBA", colour=(0, 0, 0)))
    (record,), _ = scan_images(tmp_path)
    pixel = record.load().getpixel((3, 3))
    assert pixel[0] > 100  # half-transparent black over white is grey, not black


def test_prompt_builder():
    b = PromptBuilder(["<s1>", "<s2>"])
    assert b("a circle") == "a circle, in the style of <s1><s2>"
    assert b(None) == "a picture in the style of <s1><s2>"
    custom = PromptBuilder(["<p>"], "photo of {tokens} {caption}", "photo of {tokens}")
    assert custom("smiling") == "photo of <p> smiling"
    with pytest.raises(ValueError, match="caption"):
        PromptBuilder(["<s1>"], "no caption field")
    with pytest.raises(ValueError, match="only use"):
        PromptBuilder(["<s1>"], "{caption} {oops}")


def test_buckets_and_crops():
    buckets = make_buckets(64, 8)
    assert (64, 64) in buckets
    for w, h in buckets:
        assert w % 8 == 0 and h % 8 == 0 and w * h <= 64 * 64 and max(w / h, h / w) <= 2
    assert nearest_bucket((300, 100), buckets)[0] > nearest_bucket((300, 100), buckets)[1]  # wide stays wide
    assert nearest_bucket((100, 300), buckets)[0] < nearest_bucket((100, 300), buckets)[1]
    assert nearest_bucket((50, 50), buckets) == (64, 64)
    with pytest.raises(ValueError, match="multiple"):
        make_buckets(60, 8)

    image = Image.fromarray(np.arange(40 * 20 * 3, dtype=np.uint8).reshape(20, 40, 3) % 255)
    out, (top, left) = resize_and_crop(image, (16, 16), "center")
    assert out.size == (16, 16) and top == 0 and left == 8  # scaled to 32x16, centre window
    rng1, rng2 = random.Random(3), random.Random(3)
    a, pos_a = resize_and_crop(image, (16, 16), "random", rng1)
    b, pos_b = resize_and_crop(image, (16, 16), "random", rng2)
    assert pos_a == pos_b and np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="crop"):
        resize_and_crop(image, (16, 16), "middle")


def test_bucket_batches_group_by_bucket_and_cover_everything():
    buckets = [(8, 8), (16, 8), (8, 8), (16, 8), (8, 8)]
    batches = list(bucket_batches(buckets, 2, random.Random(0)))
    assert sorted(i for b in batches for i in b) == list(range(5))
    for batch in batches:
        assert len({buckets[i] for i in batch}) == 1
    again = list(bucket_batches(buckets, 2, random.Random(0)))
    assert batches == again
