"""Review of ``python -m latentclip encode``'s image reading and folder planning (no ComfyUI needed).

Real-world images that encoded wrongly or stopped a run before the fixes: a camera photo with an EXIF
orientation was encoded sideways; transparent pixels of RGBA/LA/P PNGs showed whatever colour hid under
them (often black); a 16-bit grayscale PNG came out white; a thin banner (1 x 3000 pixels) was first
resized to a 192000 x 64 image (at --size 512: 1.5M x 512, gigabytes); an image past PIL's
decompression-bomb limit was "expected a JPEG/PNG/WebP image" (it was one); macOS' ``._NAME.jpg``
metadata files (zip files, external disks) stopped the run as undecodable images; an animated image's
file was left open. Ordinary images must decode exactly as before (shards of a resumed run stay consistent).
"""
import io
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from latentclip.encode import load_image, plan_jobs
from latentclip.errors import InputError


def _old_load(img: Image.Image, size: int) -> torch.Tensor:
    """The pipeline every shard so far was encoded with (for images it did not get wrong)."""
    img = img.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return torch.from_numpy(np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0)


def _photo(w=80, h=48) -> Image.Image:
    """Left part blue, right part red, a green band at the top: every orientation looks different."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (0, 0, 255)
    a[:, w // 2:] = (255, 0, 0)
    a[: h // 4] = (0, 255, 0)
    return Image.fromarray(a)


@pytest.mark.parametrize("orientation", range(2, 9))
def test_exif_orientation_is_honoured_as_a_viewer_shows_the_photo(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "IMG_0001.JPG"
    _photo().save(path, exif=exif.tobytes(), quality=95)
    upright = ImageOps.exif_transpose(Image.open(path))     # Pillow's own reading of the tag
    got = load_image(path, 16)
    assert torch.equal(got, _old_load(upright, 16))
    assert not torch.equal(got, _old_load(Image.open(path), 16))   # before: the stored (sideways) pixels


def _png16(path, array: np.ndarray, colour_type: int) -> None:
    """A 16-bit PNG written by hand (PIL writes 16-bit grayscale only)."""
    h, w = array.shape[:2]
    raw = b"".join(b"\0" + array[y].astype(">u2").tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
                     + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b""))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_a_16_bit_grayscale_png_is_its_picture_not_white(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))
    _png16(tmp_path / "depth.png", ramp, 0)
    got = load_image(tmp_path / "depth.png", 32)
    want = torch.from_numpy(np.rint(ramp / 257).astype(np.float32) / 255)
    assert torch.allclose(got[..., 0], want, atol=1.5 / 255), got[..., 0][0]   # before: 255 from the second column on
    assert torch.equal(got[..., 0], got[..., 1]) and torch.equal(got[..., 0], got[..., 2])


def _transparent(mode: str) -> Image.Image:
    """Left half fully transparent (the colour under it: black), right half opaque red (grey for LA)."""
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:, 16:] = (255, 0, 0, 255)
    img = Image.fromarray(rgba)
    if mode == "LA":
        return img.convert("LA")
    if mode == "P":
        return _palette()
    if mode == "RGB+tRNS":
        img = img.convert("RGB")
        img.info["transparency"] = (0, 0, 0)
        return img
    return img


def _palette() -> Image.Image:
    p = Image.new("P", (32, 32), 0)
    p.paste(1, (16, 0, 32, 32))
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.info["transparency"] = 0
    return p


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "RGB+tRNS"])
def test_transparent_pixels_are_composited_on_white(tmp_path, mode):
    path = tmp_path / f"logo-{mode}.png"
    img = _transparent(mode)
    img.save(path, transparency=img.info["transparency"]) if "transparency" in img.info else img.save(path)
    got = load_image(path, 32)
    assert torch.equal(got[:, :16], torch.ones(32, 16, 3)), got[0, 0]         # before: black
    assert torch.equal(got[:, 24:], _old_load(Image.open(path).convert("RGBA"), 32)[:, 24:])   # the opaque half as before


def test_half_transparent_pixels_blend_with_white(tmp_path):
    path = tmp_path / "glass.webp"
    Image.new("RGBA", (8, 8), (255, 0, 0, 128)).save(path, lossless=True)
    r, g, b = (load_image(path, 8)[4, 4] * 255).round().tolist()
    assert r == 255 and 126 <= g <= 128 and g == b


@pytest.mark.parametrize("kind", ["jpeg", "JPG-upper", "gray", "opaque-rgba", "palette", "cmyk", "exif-1", "tiny",
                                  "animated-webp", "rgb16"])
def test_ordinary_images_decode_exactly_as_before(tmp_path, kind):
    """Shards already written hold these images' latents: a resumed run must make the same ones."""
    photo = _photo(70, 45)
    path = tmp_path / ("a.JPG" if kind == "JPG-upper" else "a.jpg" if kind in ("jpeg", "cmyk", "exif-1") else
                       "a.webp" if kind == "animated-webp" else "a.png")
    if kind in ("jpeg", "JPG-upper"):
        photo.save(path, format="JPEG")
    elif kind == "gray":
        photo.convert("L").save(path)
    elif kind == "opaque-rgba":
        photo.convert("RGBA").save(path)
    elif kind == "palette":
        photo.convert("P").save(path)
    elif kind == "cmyk":
        photo.convert("CMYK").save(path, format="JPEG")
    elif kind == "exif-1":
        exif = Image.Exif()
        exif[0x0112] = 1
        photo.save(path, exif=exif.tobytes())
    elif kind == "tiny":
        photo.resize((3, 5)).save(path)
    elif kind == "animated-webp":
        photo.save(path, save_all=True, append_images=[photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], lossless=True)
    elif kind == "rgb16":
        _png16(path, np.asarray(photo).astype(np.uint16) * 257, 2)
    assert torch.equal(load_image(path, 32), _old_load(Image.open(path), 32))


def test_a_thin_banner_is_not_first_resized_to_an_enormous_image(tmp_path, monkeypatch):
    """A 1 x 3000 banner at --size 64 was resized to 192000 x 64 before the crop (at --size 512 a 1 x 4000
    one: 2M x 512, 3 GB, times --workers): one such image could end a long run with an out-of-memory kill."""
    ramp = np.linspace(0, 255, 3000).astype(np.uint8)
    Image.fromarray(np.stack([ramp, 255 - ramp, ramp // 2], -1)[None]).save(tmp_path / "rule.png")
    made = []
    resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, sz, *a, **k: made.append(sz) or resize(self, sz, *a, **k))
    got = load_image(tmp_path / "rule.png", 64)
    monkeypatch.undo()
    assert got.shape == (64, 64, 3)
    assert max(w * h for w, h in made) <= 64 * 64 * 64, made
    # the same crop of the same picture as before (the centre of the line, up to rounding)
    assert (got - _old_load(Image.open(tmp_path / "rule.png"), 64)).abs().max() <= 2 / 255


def test_an_image_past_the_decompression_bomb_limit_is_one_clear_sentence(tmp_path):
    path = tmp_path / "panorama.png"     # a header that claims 20000 x 10000 pixels: refused before decoding
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 10000, 8, 0, 0, 0, 0))
                     + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b""))
    with pytest.raises(InputError) as e:
        load_image(path, 64)
    msg = str(e.value)
    assert "panorama.png" in msg and "200,000,000 pixels" in msg and "expected an image of at most" in msg, msg
    assert "JPEG/PNG/WebP" not in msg     # it is a PNG: that was not what was wrong


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_a_truncated_or_damaged_image_still_stops_the_run_naming_it(tmp_path, fmt):
    """Reading the EXIF orientation must not hide a decoding error (PIL then returns the part it decoded)."""
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 64, 3), np.uint8)).save(buf, format=fmt)
    data = bytearray(buf.getvalue())
    damaged = [("cut", data[: len(data) * 2 // 3])]
    if fmt == "PNG":   # a PNG's checksums find flipped bytes (a JPEG or WebP decodes them as other pixels)
        damaged.append(("flipped", data[:60] + bytes(b ^ 0x5A for b in data[60:90]) + data[90:]))
    for name, bad in damaged:
        path = tmp_path / f"{name}.{fmt.lower()}"
        path.write_bytes(bytes(bad))
        with pytest.raises(InputError, match=rf"image .*{name}\.{fmt.lower()} could not be decoded"):
            load_image(path, 16)


def test_an_animated_image_file_is_closed_after_decoding(tmp_path):
    frames = [_photo(16, 16), _photo(16, 16).transpose(Image.Transpose.ROTATE_180)]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    import gc
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_image(tmp_path / "anim.png", 8)
        gc.collect()
    assert not [w for w in seen if issubclass(w.category, ResourceWarning)], [str(w.message) for w in seen]


APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(200)


def test_macos_apple_double_files_are_not_taken_for_images(tmp_path):
    """Unzipped on Linux, a folder zipped on a Mac holds ``__MACOSX/._NAME.jpg`` (and a copy from a Mac's
    external disk ``._NAME.jpg`` beside each photo): resource forks, not images. They stopped the run."""
    folder = tmp_path / "photos"
    (folder / "__MACOSX").mkdir(parents=True)
    _photo().save(folder / "beach.JPG", format="JPEG")
    (folder / "._beach.JPG").write_bytes(APPLE_DOUBLE)
    (folder / "__MACOSX" / "._beach.JPG").write_bytes(APPLE_DOUBLE)
    _photo().save(folder / "._real.png")       # a real image that happens to start with '._' is kept
    (job,) = plan_jobs([folder])
    assert [key for key, _, _, _ in job.items()] == ["__real", "beach"]
    for _, source, _, _ in job.items():
        assert load_image(source, 16).shape == (16, 16, 3)


def test_a_tar_of_photos_whose_names_hold_dots_is_refused_not_silently_dropped(tmp_path):
    """WebDataset's key ends at a name's first dot, so ``IMG_2023.05.01.jpg`` in a tar is key ``IMG_2023`` with
    extension ``05.01.jpg``: no image extension. Such photos were skipped without a word (the shard came out
    short, or empty). A sample that also has a plain ``KEY.jpg`` keeps ignoring its other members (``KEY.seg.png``)."""
    import tarfile
    buf = io.BytesIO()
    _photo().save(buf, format="JPEG")
    with tarfile.open(tmp_path / "photos.tar", "w") as tar:
        for name in ("000001.jpg", "000001.seg.png", "000001.txt", "IMG_2023.05.01.jpg"):
            info = tarfile.TarInfo(name)
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    (job,) = plan_jobs([tmp_path / "photos.tar"])
    with pytest.raises(InputError, match=r"shard 'photos\.tar' holds 'IMG_2023\.05\.01\.jpg', .*expected .*KEY\.jpg"):
        job.items()
