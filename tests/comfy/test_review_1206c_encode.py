"""Review of ``python -m latentclip encode`` on a real-world folder, through ComfyUI's VAE loader.

A folder copied from a Mac holds camera photos with an EXIF orientation, macOS' ``._NAME.JPG`` metadata
files, a transparent logo, a 16-bit grayscale PNG and a thin banner. Before the fixes the run stopped at
the first metadata file; without it the photo was encoded sideways (VAE and teacher alike), the logo's
transparent part black and the 16-bit image white. (Image-level details: tests/core/test_review_1206c_shards.py.)
"""
import logging

import numpy as np
import pytest
import torch

import comfy_server

_harness = comfy_server._sibling("conftest", "latentclip_tests_comfy_conftest")  # whichever conftest is imported
COMFYUI = _harness.COMFYUI

APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(200)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A random Flux-architecture VAE and a random ViT-B-32 teacher, as files (test_distill_path's pattern)."""
    import open_clip
    from safetensors.torch import save_file
    from latentclip.comfy_vae import random_vae_state_dict
    root = tmp_path_factory.mktemp("encode1206c")
    logging.disable(logging.WARNING)
    try:
        sd = random_vae_state_dict("flux", COMFYUI)
        save_file({k: v.half() for k, v in sd.items()}, str(root / "flux-arch-vae.safetensors"))
    finally:
        logging.disable(logging.NOTSET)
    torch.manual_seed(0)
    teacher = open_clip.create_model("ViT-B-32", pretrained=None)
    save_file({k: v.half().contiguous() for k, v in teacher.state_dict().items()}, str(root / "vit-b-32.safetensors"))
    return root


def _encode(assets, out, source, *extra):
    from latentclip.__main__ import main
    return main(["encode", str(source), "--out", str(out), "--vae", str(assets / "flux-arch-vae.safetensors"),
                 "--family", "flux", "--teacher", str(assets / "vit-b-32.safetensors"), "--comfyui", str(COMFYUI),
                 "--size", "64", "--batch", "2", *extra])


def _photo():
    from PIL import Image
    a = np.zeros((64, 96, 3), np.uint8)
    a[:, :48] = (20, 40, 230)
    a[:, 48:] = (230, 30, 20)
    a[:16] = (30, 200, 40)
    return Image.fromarray(a)


def test_a_folder_copied_from_a_mac_encodes_upright_photos_and_skips_its_metadata_files(assets, tmp_path):
    from PIL import Image, ImageOps
    from latentclip.train.shards import ShardIndex
    folder, ref = tmp_path / "camera", tmp_path / "upright"
    (folder / "__MACOSX").mkdir(parents=True)
    ref.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6                                   # "rotate 90 degrees clockwise to show"
    _photo().save(folder / "DSC_0001.JPG", exif=exif.tobytes(), quality=95)
    (folder / "DSC_0001.txt").write_text("a green bar above blue and red")
    (folder / "._DSC_0001.JPG").write_bytes(APPLE_DOUBLE)
    (folder / "__MACOSX" / "._DSC_0001.JPG").write_bytes(APPLE_DOUBLE)
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[16:48, 16:48] = (200, 0, 0, 255)              # a red square on a transparent (hidden: black) ground
    Image.fromarray(rgba).save(folder / "logo.png")
    Image.fromarray(np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))).save(folder / "depth.png")
    ramp = np.linspace(0, 255, 3000).astype(np.uint8)
    Image.fromarray(np.stack([ramp, ramp, ramp], -1)[None]).save(folder / "rule.png")
    # what a viewer shows, as plain 8-bit RGB files: the shards of both folders must agree
    ImageOps.exif_transpose(Image.open(folder / "DSC_0001.JPG")).save(ref / "DSC_0001.png")
    logo = Image.new("RGB", (64, 64), (255, 255, 255))
    logo.paste((200, 0, 0), (16, 16, 48, 48))
    logo.save(ref / "logo.png")
    Image.fromarray(np.rint(np.tile(np.linspace(0, 65535, 64), (64, 1)) / 257).astype(np.uint8)).save(ref / "depth.png")

    out, ref_out = tmp_path / "out", tmp_path / "ref-out"
    assert _encode(assets, out, folder, "--workers", "2") == 0     # before: the '._' file stopped the run
    assert _encode(assets, ref_out, ref, "--workers", "0") == 0
    got, want = ShardIndex(out), ShardIndex(ref_out)
    samples = {got[i].key: got[i] for i in range(len(got))}
    assert sorted(samples) == ["DSC_0001", "depth", "logo", "rule"]
    assert samples["DSC_0001"].caption == "a green bar above blue and red"
    for i in range(len(want)):
        w = want[i]
        g = samples[w.key]
        np.testing.assert_allclose(g.latent.astype(np.float32), w.latent.astype(np.float32), atol=2e-3, rtol=2e-3,
                                   err_msg=w.key)
        np.testing.assert_allclose(g.teacher, w.teacher, atol=1e-4, err_msg=w.key)
    assert np.isfinite(samples["rule"].latent.astype(np.float32)).all()
    got.close()
    want.close()
    assert _encode(assets, out, folder, "--workers", "2") == 0     # a rerun finds the shard finished


def test_a_rank_whose_rank_0_never_ran_leaves_a_folder_the_rerun_resumes(assets, tmp_path, monkeypatch, capsys):
    """torchrun with 2 ranks where rank 0 died before writing encode.json: rank 1's shard must not make
    every rerun refuse the folder ("holds files but no encode.json"). Rank 1 alone, then rank 0 alone:
    together every image is encoded once, and the shards equal a one-process run's."""
    from PIL import Image
    from latentclip.train.shards import ShardIndex
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (64, 64), (60 * i, 100, 200 - 40 * i)).save(folder / f"img{i}.png")
    out, ref = tmp_path / "out", tmp_path / "ref"
    assert _encode(assets, ref, folder, "--shard-size", "2") == 0
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", "0")
        assert _encode(assets, out, folder, "--shard-size", "2", "--device", "cpu") == 0, capsys.readouterr().err
        if rank == "1":
            assert (out / "encode.json").is_file() and sorted(p.name for p in out.glob("*.tar")) == ["000001.tar"]
    a, b = ShardIndex(ref), ShardIndex(out)
    assert [a[i].key for i in range(len(a))] == [b[i].key for i in range(len(b))]
    assert all(np.array_equal(a[i].latent, b[i].latent) for i in range(len(a)))
