"""The whole distillation path on real architectures, on CPU: images -> encode -> torchrun distil -> load.

Randomly initialised SD3/Flux- and Wan-2.1-architecture VAEs at their real size, built by ComfyUI's
own classes and saved as files, are loaded back by ComfyUI's VAE loader inside
``python -m latentclip encode``; a random ViT-B-32 (open_clip) file is the teacher. Images are 64x64
so the real-size VAEs encode in seconds.
"""
import io
import json
import logging
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

import comfy_server

_harness = comfy_server._sibling("conftest", "latentclip_tests_comfy_conftest")  # whichever conftest is imported
COMFYUI, REPO = _harness.COMFYUI, _harness.REPO

CAPTIONS = ["a red circle on grey", "a blue square on white", "two green stripes", "a yellow dot left of a box"]


def _image(i: int):
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (80, 64), (200 - 40 * i, 180, 40 * i))  # not square: encode crops the centre
    ImageDraw.Draw(img).ellipse((10 + 5 * i, 12, 50 + 5 * i, 52), fill=(255, 30 * i, 0))
    return img


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    import open_clip
    from safetensors.torch import save_file
    from latentclip.comfy_vae import random_vae_state_dict
    root = tmp_path_factory.mktemp("distill")
    logging.disable(logging.WARNING)  # the detection stand-in tensors make ComfyUI list missing keys
    try:
        for arch in ("flux", "wan21"):
            sd = random_vae_state_dict(arch, COMFYUI)
            save_file({k: v.half() for k, v in sd.items()}, str(root / f"{arch}-arch-vae.safetensors"))
    finally:
        logging.disable(logging.NOTSET)
    torch.manual_seed(0)
    teacher = open_clip.create_model("ViT-B-32", pretrained=None)
    save_file({k: v.half().contiguous() for k, v in teacher.state_dict().items()}, str(root / "vit-b-32.safetensors"))
    folder = root / "images"
    folder.mkdir()
    for i in range(4):
        _image(i).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(CAPTIONS[i])
    with tarfile.open(root / "00000.tar", "w") as tar:  # img2dataset's layout: NNN.jpg, NNN.txt, NNN.json
        for i in range(4):
            buf = io.BytesIO()
            _image(i).save(buf, format="JPEG")
            for ext, data in (("jpg", buf.getvalue()), ("txt", CAPTIONS[i].encode()),
                              ("json", json.dumps({"key": f"{i:09d}", "status": "success"}).encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    student = root / "student.json"  # a small image tower on the 8x8 latents of 64-pixel images
    student.write_text(json.dumps({"embed_dim": 512, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64,
                                                                    "patch_size": 1}, "text_cfg": {}}))
    return root


def _encode(assets, out, family, vae, source, *extra):
    from latentclip.__main__ import main
    return main(["encode", str(source), "--out", str(out), "--vae", str(assets / vae), "--family", family,
                 "--teacher", str(assets / "vit-b-32.safetensors"), "--comfyui", str(COMFYUI), "--size", "64",
                 "--batch", "2", *extra])


def test_flux_path_encode_tar_then_torchrun_two_processes_then_load(assets, capsys):
    from latentclip.comfy_vae import ComfyVAE
    from latentclip.encode import load_image
    from latentclip.train.shards import ShardIndex
    import latentclip

    shards = assets / "flux-shards"
    assert _encode(assets, shards, "flux", "flux-arch-vae.safetensors", assets / "00000.tar") == 0
    index = ShardIndex(shards)
    assert len(index) == 4 and index.shards[0].name == "00000.tar"
    sample = index[0]
    assert sample.latent.shape == (16, 8, 8) and sample.caption == CAPTIONS[0]
    assert abs(np.linalg.norm(sample.teacher) - 1) < 1e-5
    # the stored latent is what ComfyUI's loader and VAE.encode make of the same centre crop
    vae = ComfyVAE(assets / "flux-arch-vae.safetensors", COMFYUI)
    crop = load_image((assets / "00000.tar", _member_span(assets / "00000.tar", "000000000.jpg")), 64)
    with torch.no_grad():
        expected = vae.vae.encode(crop[None]).float()[0].numpy()
    np.testing.assert_allclose(sample.latent.astype(np.float32), expected, rtol=2e-3, atol=2e-3)

    # rerun: every shard is done, nothing is encoded again
    capsys.readouterr()
    stamp = index.shards[0].stat().st_mtime_ns
    assert _encode(assets, shards, "flux", "flux-arch-vae.safetensors", assets / "00000.tar") == 0
    assert "1 already done, 0 to encode" in capsys.readouterr().err
    assert index.shards[0].stat().st_mtime_ns == stamp

    out = assets / "flux-latent-clip.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "latentclip.train", "distill", "--data", str(shards), "--teacher", str(assets / "vit-b-32.safetensors"),
           "--teacher-model", "ViT-B-32", "--config", str(assets / "student.json"), "--out", str(out),
           "--work", str(assets / "flux-work"), "--batch", "1", "--steps", "2", "--warmup", "1",
           "--contrastive-weight", "0.5", "--log-every", "1"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es) x batch 1" in done.stderr and "step 2/2" in done.stderr

    model = latentclip.load(out)
    assert (model.vae_family, model.latent_channels) == ("flux", 16)
    meta = latentclip.checkpoints.read_safetensors_header(out)["__metadata__"]
    assert json.loads(meta["teacher"])["model"] == "ViT-B-32" and meta["steps"] == "2"
    assert json.loads(meta["data"])["vae"] == "flux-arch-vae.safetensors"
    # the text tower is the teacher's, frozen: same text embeddings (fp16 file)
    from latentclip.pixel_clip import load_pixel_clip
    teacher, tokenizer, _ = load_pixel_clip(assets / "vit-b-32.safetensors", "ViT-B-32")
    with torch.no_grad():
        want = teacher.encode_text(tokenizer(CAPTIONS))
        got = model.encode_text(CAPTIONS)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    scores = latentclip.clip_score(model, torch.from_numpy(sample.latent[None].astype(np.float32)), CAPTIONS[0])
    assert torch.isfinite(scores).all()


def _member_span(tar_path, name):
    with tarfile.open(tar_path) as tar:
        info = tar.getmember(name)
        return info.offset_data, info.size


@pytest.mark.parametrize("family, vae", [("sd3", "flux-arch-vae.safetensors"), ("wan21", "wan21-arch-vae.safetensors")])
def test_folder_encode_and_distil_one_process(assets, family, vae):
    from latentclip.train.distill import Settings, run
    from latentclip.train.shards import ShardIndex
    import latentclip
    shards = assets / f"{family}-shards"
    assert _encode(assets, shards, family, vae, assets / "images", "--shard-size", "3") == 0
    index = ShardIndex(shards)
    assert [p.name for p in index.shards] == ["000000.tar", "000001.tar"] and len(index) == 4
    assert index[3].latent.shape == (16, 8, 8)  # a Wan latent is stored without its frame axis
    out = assets / f"{family}-latent-clip.safetensors"
    run(Settings(data=str(shards), teacher=str(assets / "vit-b-32.safetensors"), teacher_model="ViT-B-32",
                 config=str(assets / "student.json"), out=str(out), work=str(assets / f"{family}-work"),
                 batch=2, steps=1, warmup=1), log=lambda m: None)
    model = latentclip.load(out)
    assert (model.vae_family, model.latent_channels) == (family, 16)


@pytest.mark.parametrize("family, says", [("sdxl", "4-channel, 8x, 2-D"), ("wan21", "16-channel, 8x, 3-D")])
def test_wrong_family_vae_is_one_clear_error(assets, family, says, capsys):
    code = _encode(assets, assets / f"wrong-{family}", family, "flux-arch-vae.safetensors", assets / "images")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: VAE file 'flux-arch-vae.safetensors' makes 16-channel, 8x, 2-D latents but "
                              f"family '{family}' has {says} latents"), err[-1]
    assert not list((assets / f"wrong-{family}").glob("*.tar"))


def test_teacher_that_does_not_load_is_one_clear_error(assets, capsys, tmp_path):
    bad = tmp_path / "teacher.bin"
    bad.write_bytes(b"not a checkpoint")
    from latentclip.__main__ import main
    code = main(["encode", str(assets / "images"), "--out", str(tmp_path / "o"), "--vae",
                 str(assets / "flux-arch-vae.safetensors"), "--family", "flux", "--teacher", str(bad),
                 "--comfyui", str(COMFYUI), "--size", "64"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: teacher file 'teacher.bin' does not load"), err


def test_the_distilled_flux_latent_clip_runs_the_nodes_in_a_real_server(assets):
    """The torchrun test's file, as a user would use it: in models/latent_clip of a real server, scoring,
    the safety filter, safety guidance and FK search on a tiny Flux-architecture model's 16-channel latents."""
    out = assets / "flux-latent-clip.safetensors"
    if not out.exists():
        pytest.skip("needs the file the torchrun test of this module distils")
    import shutil
    import latentclip
    import test_families_server as fam
    srv = comfy_server.ComfyServer(COMFYUI, extra_packs=[fam.FIXTURE_PACK])
    shutil.copyfile(out, srv.models / "latent_clip" / "distilled-flux.safetensors")
    with srv:
        x = torch.randn(2, 16, fam.SIDE, fam.SIDE, generator=torch.Generator().manual_seed(5))
        name = fam.write_latent(srv, "distilled.latent", x)
        graph = {"1": fam.loader("distilled-flux.safetensors"),
                 "2": {"class_type": "LoadLatent", "inputs": {"latent": name}},
                 "3": {"class_type": "LatentCLIPScore", "inputs": {"latent_clip": ["1", 0], "samples": ["2", 0],
                                                                   "text": CAPTIONS[0]}},
                 "5": {"class_type": "LatentCLIPSafetyFilter", "inputs": {"latent_clip": ["1", 0], "samples": ["2", 0],
                                                                          "concepts": "blood", "threshold": 0.5,
                                                                          "action": "flag only"}},
                 "95": {"class_type": "PreviewAny", "inputs": {"source": ["5", 3]}}, **fam.shown("3")}
        scored = fam.succeeded(srv.run(graph))
        model = latentclip.load(srv.models / "latent_clip" / "distilled-flux.safetensors", device="cpu", dtype=torch.float32)
        want = latentclip.clip_score(model, x, CAPTIONS[0]).tolist()
        assert fam.reported_scores(scored["3"]["text"][0]) == pytest.approx(want, abs=5e-3)
        steered = fam.succeeded(srv.run(fam.sampling_graph("flux", "distilled-flux.safetensors"), timeout=240))
        assert "guided 3/3" in steered["22"]["text"][0]
        history = json.loads(steered["935"]["text"][0])["history"]
        assert [e["kind"] for e in history["events"]] == ["resample"] * 3


def _images(tmp_path, n=4):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(n):
        _image(i).save(folder / f"img{i}.png")
    return folder


def _last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("case, says", [
    ("not_an_image", r"error: image .*x\.jpg could not be decoded .*; expected a JPEG/PNG/WebP image"),
    ("key_clash", r"error: images 'img0\.png' and 'img0\.webp' in .* would share the sample key 'img0'; rename one"),
    ("out_is_input", r"error: --out '.*imgs' is the folder of input '.*imgs'; give another folder for the shards"),
    ("strangers_out", r"error: --out '.*' holds files but no encode\.json; give a new or empty folder"),
    ("damaged_manifest", r"error: '.*encode\.json' could not be read as JSON \(JSONDecodeError\)")])
def test_bad_encode_input_is_one_clear_sentence_and_nothing_is_written(assets, tmp_path, capsys, case, says):
    import re
    folder, out = _images(tmp_path), tmp_path / "out"
    if case == "not_an_image":
        (folder / "x.jpg").write_text("hello")
    elif case == "key_clash":
        _image(0).save(folder / "img0.webp")
    elif case == "out_is_input":
        out = folder
    elif case == "strangers_out":
        out.mkdir()
        (out / "00000.tar").write_bytes(b"someone else's shard")
    elif case == "damaged_manifest":
        out.mkdir()
        (out / "encode.json").write_text("{not json")
    before = {p.name: p.read_bytes() for p in out.rglob("*")} if out.exists() else {}
    assert _encode(assets, out, "flux", "flux-arch-vae.safetensors", folder) == 2
    err = _last_error(capsys)
    assert re.match(says, err), err
    after = {p.name: p.read_bytes() for p in out.rglob("*")} if out.exists() else {}
    assert {k: after.get(k) for k in before} == before                 # nothing of the user's is touched
    assert not [n for n in set(after) - set(before) if n.endswith(".tar")]   # and no shard is written
    if case != "not_an_image":                                          # refused before anything is set up
        assert after == before and out.exists() == bool(before)


def test_folder_resume_checks_finished_shards_and_captions_need_not_be_utf8(assets, tmp_path, capsys):
    import re
    from latentclip.train.shards import ShardIndex
    from latentclip.train.distill import load_teacher, teacher_fingerprint
    folder, out = _images(tmp_path, 3), tmp_path / "out"
    (folder / "img1.txt").write_bytes(b"caf\xe9 on grey")            # Latin-1, not UTF-8
    assert _encode(assets, out, "flux", "flux-arch-vae.safetensors", folder, "--shard-size", "2") == 0
    index = ShardIndex(out)
    assert len(index) == 3 and index[1].caption == "caf\ufffd on grey"
    manifest = json.loads((out / "encode.json").read_text())
    assert manifest["teacher"]["fingerprint"] == teacher_fingerprint(load_teacher(assets / "vit-b-32.safetensors").model)
    stamps = sorted(p.stat().st_mtime_ns for p in out.glob("*.tar"))
    # another --shard-size, or an image added to a finished shard: refused, not skipped or encoded twice
    assert _encode(assets, out, "flux", "flux-arch-vae.safetensors", folder, "--shard-size", "3") == 2
    assert re.search(r"--out shard '000000\.tar' holds 2 samples but the inputs now give it 3", _last_error(capsys))
    _image(3).save(folder / "img0a.png")                              # sorts into the first shard
    assert _encode(assets, out, "flux", "flux-arch-vae.safetensors", folder, "--shard-size", "2") == 2
    assert "the inputs or --shard-size changed since it was written" in _last_error(capsys)
    assert sorted(p.stat().st_mtime_ns for p in out.glob("*.tar")) == stamps


def test_a_long_image_file_name_is_encoded_and_read_back(assets, tmp_path):
    """A sample key past ustar's 100 bytes failed the shard (ValueError: name is too long) after its images were encoded."""
    from latentclip.train.shards import ShardIndex
    folder, out = tmp_path / "imgs", tmp_path / "out"
    (folder / "holiday").mkdir(parents=True)
    name = "a very long descriptive file name as scrapers write them, " * 2
    _image(0).save(folder / "holiday" / f"{name}.png")
    (folder / "holiday" / f"{name}.txt").write_text(CAPTIONS[0])
    assert _encode(assets, out, "flux", "flux-arch-vae.safetensors", folder) == 0
    index = ShardIndex(out)
    assert len(index) == 1 and index[0].key == f"holiday_{name}".replace(".", "_") and index[0].caption == CAPTIONS[0]
    index.close()
    assert _encode(assets, out, "flux", "flux-arch-vae.safetensors", folder) == 0   # a rerun finds it finished


def test_a_bare_cuda_device_does_not_make_comfyui_setup_fail():
    """torch.cuda.set_device refuses a device without an index (a ValueError before any CUDA call), so
    ``ComfyVAE(path, root, "cuda")`` failed on every GPU machine."""
    from latentclip.comfy_vae import _import_comfy
    _import_comfy(COMFYUI, torch.device("cpu"))       # ComfyUI set up for this CPU machine, as the other tests
    assert _import_comfy(COMFYUI, torch.device("cuda")).sd.VAE is not None


def test_a_vae_that_gives_nan_latents_is_refused_at_encode_and_no_shard_is_written(assets, tmp_path, capsys):
    """Before, NaN latents went into the shards and the trainer refused them only when it met them."""
    from safetensors.torch import load_file, save_file
    sd = load_file(str(assets / "flux-arch-vae.safetensors"))
    key = next(k for k in sd if k.startswith("encoder.") and k.endswith("conv_out.bias"))
    sd[key] = torch.full_like(sd[key], float("nan"))
    save_file(sd, str(tmp_path / "nan-vae.safetensors"))
    out = tmp_path / "out"
    assert _encode(assets, out, "flux", tmp_path / "nan-vae.safetensors", _images(tmp_path)) == 2   # absolute: assets / it
    err = _last_error(capsys)
    assert "the VAE gave NaN or infinite values for 2 of 2 images of shard" in err and "img0" in err
    assert not list(out.glob("*.tar"))


@pytest.mark.parametrize("workers", ["0", "3"])
def test_decoding_threads_write_the_same_shards_as_decoding_in_turn(assets, tmp_path, workers):
    """--workers decodes the next batch while this one encodes: the samples are exactly the ones decoding in
    turn writes (batch 2 over 5 images in shards of 4: a short last batch, several batches per shard)."""
    folder = _images(tmp_path, 5)
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert _encode(assets, ref, "flux", "flux-arch-vae.safetensors", folder, "--batch", "2", "--workers", "0",
                   "--shard-size", "4") == 0
    assert _encode(assets, out, "flux", "flux-arch-vae.safetensors", folder, "--batch", "2", "--workers", workers,
                   "--shard-size", "4") == 0
    from latentclip.train.shards import ShardIndex
    a, b = ShardIndex(ref), ShardIndex(out)
    assert len(a) == len(b) == 5
    for i in range(5):
        x, y = a[i], b[i]
        assert x.key == y.key and x.caption == y.caption
        assert np.array_equal(x.latent, y.latent) and np.array_equal(x.teacher, y.teacher)


def test_decoded_batches_yield_every_item_once_in_order_and_raise_a_bad_image_where_it_lies(tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    from latentclip.encode import decoded_batches
    from latentclip.errors import InputError
    folder = _images(tmp_path, 5)
    (folder / "img2.png").write_text("not a png")
    items = [(p.stem, p, "", {}) for p in sorted(folder.glob("*.png"))]
    with ThreadPoolExecutor(3) as decoders, ThreadPoolExecutor(1) as ahead:
        seen = []
        with pytest.raises(InputError, match=r"img2\.png could not be decoded"):
            for chunk, images in decoded_batches(items, 2, 16, decoders, ahead):
                assert images.shape == (len(chunk), 16, 16, 3)
                seen += [k for k, _, _, _ in chunk]
        assert seen == ["img0", "img1"]          # the batch before the bad one was yielded first
