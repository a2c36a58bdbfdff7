"""The shipped mini-world weights (weights/mini): manifest, loading through latentclip.load, one eval batch."""
import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import latentclip
from latentclip.configs import WEIGHTS_DIR
from latentclip.miniworld import eval as E
from latentclip.miniworld import scenes as S
from latentclip.miniworld.clips import load_pixel_clip
from latentclip.miniworld.manifest import content_sha256, sha256
from latentclip.miniworld.vae import images_to_tensor, load_vae

MINI = WEIGHTS_DIR / "mini"


@pytest.fixture(scope="module")
def models():
    return {"vae": load_vae(MINI / E.FILES["vae"]), "latent": latentclip.load(MINI / E.FILES["latent"]),
            "pixel": load_pixel_clip(MINI / E.FILES["pixel"])}


def test_manifest_matches_the_files_and_the_size_budget():
    manifest = json.loads((MINI / "manifest.json").read_text())
    names = {f["file"] for f in manifest["files"]}
    assert set(E.FILES.values()) <= names  # later parts add their own files
    total = 0
    for f in manifest["files"]:
        p = MINI / f["file"]
        assert sha256(p) == f["sha256"], f"{f['file']} changed since the manifest was written"
        assert content_sha256(p) == f["content_sha256"]
        total += p.stat().st_size
    assert total <= 40 * 2**20
    zs = manifest["scores"]["zero_shot"]
    assert set(zs) == {"pixel", "latent"} and all(0 <= v <= 1 for m in zs.values() for v in m.values())


def test_content_hash_ignores_header_key_order_but_not_values(tmp_path):
    a = tmp_path / "a.safetensors"
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(a), metadata={"seed": "0", "format": "x", "steps": "9"})
    raw = a.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["__metadata__"] = dict(reversed(list(header["__metadata__"].items())))

    def write(path, head):
        text = json.dumps(dict(reversed(list(head.items())))).encode()
        text += b" " * (-len(text) % 8)
        path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])

    b, c = tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    write(b, header)
    write(c, {**header, "__metadata__": {**header["__metadata__"], "seed": "1"}})
    assert sha256(a) != sha256(b) and content_sha256(a) == content_sha256(b)
    assert content_sha256(a) != content_sha256(c)
    assert torch.equal(load_file(str(b))["w"], load_file(str(a))["w"])


def test_latent_clip_loads_through_the_public_loader(models):
    m = models["latent"]
    assert m.vae_family == "mini" and m.latent_channels == 4 and m.latent_size == 8
    assert not any(p.requires_grad for p in m.parameters())


def test_one_eval_batch_beats_chance_on_colour_and_shape(models):
    torch.manual_seed(0)
    sets = {k: v for k, v in E.task_sets(24, seed=123).items() if k in ("shape", "color")}
    ret = E.retrieval_set(["a red circle", "a blue square", "two green triangles", "a yellow object"], per_prompt=3, seed=5)
    for kind in ("pixel", "latent"):
        acc = E.zero_shot(kind, models[kind], models["vae"], sets, ret)
        assert set(acc) == {"shape", "color", "retrieval"}
        assert acc["color"] >= 0.8 and acc["shape"] >= 0.6, (kind, acc)  # chance: 0.25 and 0.33


def test_vae_round_trip_keeps_what_the_judge_checks(models):
    batch = S.make_batch(77, 24)
    x = images_to_tensor(batch.images)
    with torch.no_grad():
        rec = models["vae"].decode(models["vae"].encode(x))
    psnr = float((10 * torch.log10(1 / ((rec - x) ** 2).flatten(1).mean(1))).mean())
    assert psnr > 24
    from latentclip.miniworld import judge as J
    assert np.mean([J.check(r, c)["ok"] for r, c in zip(rec, batch.captions)]) >= 0.75


def test_eval_cli_writes_the_json_the_issue_specifies(tmp_path):
    from latentclip.miniworld.__main__ import main
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\na green triangle above a yellow circle\n")
    out = tmp_path / "scores.json"
    assert main(["eval", "--json", str(out), "--prompts", str(prompts), "--n", "8", "--per-prompt", "2",
                 "--judge-n", "16", "--threads", "1", "--no-generation"]) == 0
    r = json.loads(out.read_text())
    for kind in ("pixel", "latent"):
        assert set(E.TASKS) <= set(r["zero_shot"][kind])
        assert all(0 <= r["zero_shot"][kind][t] <= 1 for t in E.TASKS)
    assert r["settings"]["retrieval_captions"] == 3
    assert {"renders", "reconstructions"} <= set(r["judge"]) and r["vae"]["psnr_db"] > 0


def test_eval_cli_rejects_prompts_outside_the_grammar(tmp_path, capsys):
    from latentclip.miniworld.__main__ import main
    bad = tmp_path / "bad.txt"
    bad.write_text("a red circle\na purple hexagon\n")
    assert main(["eval", "--prompts", str(bad), "--n", "4"]) == 2
    assert "purple hexagon" in capsys.readouterr().err
