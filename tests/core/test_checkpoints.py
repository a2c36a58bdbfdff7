"""Latent-CLIP loads the authors' checkpoint layout and matches plain open_clip on the same weights."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
import open_clip
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from safetensors.torch import save_file

import latentclip
from latentclip import CheckpointError, InputError
from latentclip.configs import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def reference_clip(latent_side, patch, vw, vl, embed, tw, th, tl, ctx=77, seed=0):
    """Plain open_clip.CLIP with a 4-channel conv1, built independently of the project's code."""
    torch.manual_seed(seed)
    model = CLIP(embed, CLIPVisionCfg(image_size=latent_side, patch_size=patch, width=vw, layers=vl),
                 CLIPTextCfg(context_length=ctx, vocab_size=49408, width=tw, heads=th, layers=tl))
    model.visual.conv1 = nn.Conv2d(4, vw, kernel_size=patch, stride=patch, bias=False)
    with torch.no_grad():  # non-trivial values everywhere, including norms and biases
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def authors_checkpoint(ref: CLIP) -> dict:
    """The layout of the authors' epoch_34.pt: DDP prefix, visual.latent_vit, frozen VAE, optimizer."""
    sd = {}
    for k, v in ref.state_dict().items():
        k = "visual.latent_vit." + k[len("visual."):] if k.startswith("visual.") else k
        sd["module." + k] = v.clone()
    sd["module.visual.vae_encoder.conv_in.weight"] = torch.randn(32, 3, 3, 3)
    sd["module.visual.vae_encoder.down.0.block.0.norm1.weight"] = torch.randn(32)
    sd["module.visual.vae_quant_conv.weight"] = torch.randn(8, 8, 1, 1)
    opt_state = {i: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)} for i in range(3)}
    return {"epoch": 34, "name": "latent-clip-test", "state_dict": sd,
            "optimizer": {"state": opt_state, "param_groups": [{"lr": np.float64(5e-4), "betas": (0.9, 0.98),
                                                              "weight_decay": np.float32(0.2), "params": [0, 1, 2]}]},
            "scaler": {"scale": np.float64(65536.0)}}


SMALL = dict(latent_side=64, patch=8, vw=64, vl=2, embed=32, tw=64, th=1, tl=2)


@pytest.fixture(scope="module")
def small_ref():
    return reference_clip(**SMALL)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory, small_ref):
    path = tmp_path_factory.mktemp("ck") / "epoch_34.pt"
    torch.save(authors_checkpoint(small_ref), path)
    return path


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def compare(model, ref, latents, texts):
    with torch.no_grad():
        img = model.encode_latents(latents)
        want_img = ref.encode_image(latents)
        txt = model.encode_text(texts)
        want_txt = ref.encode_text(open_clip.tokenize(texts))
    assert rel_err(img, want_img) < 1e-5
    assert rel_err(txt, want_txt) < 1e-5
    assert torch.equal(model.logit_scale.detach(), ref.logit_scale.detach())


def test_authors_checkpoint_matches_open_clip(small_ref, small_ckpt):
    model = latentclip.load(small_ckpt)
    assert model.config["vision_cfg"]["patch_size"] == 8 and model.latent_size == 64
    compare(model, small_ref, torch.randn(3, 4, 64, 64, generator=torch.Generator().manual_seed(1)),
            ["a cat", "a photo of a dog on grass", "x"])


def test_full_b8_512_shapes_match_open_clip(tmp_path):
    ref = reference_clip(64, 8, 768, 12, 512, 512, 8, 12)
    path = tmp_path / "epoch_34.pt"
    torch.save(authors_checkpoint(ref), path)
    model = latentclip.load(path)
    cfg = get_config("Latent-ViT-B-8-512")
    assert model.config["vision_cfg"] == {k: v for k, v in cfg["vision_cfg"].items()}
    assert model.config["embed_dim"] == 512 and model.config["text_cfg"]["heads"] == 8
    latentclip.load(path, config="Latent-ViT-B-8-512")  # explicit config is checked, not refused
    compare(model, ref, torch.randn(2, 4, 64, 64), ["a red car", "an astronaut riding a horse"])


@pytest.mark.parametrize("layout", ["authors", "open_clip", "module_open_clip"])
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_bare_state_dicts_in_either_layout(tmp_path, small_ref, layout, fmt):
    full = authors_checkpoint(small_ref)["state_dict"]
    if layout == "authors":
        sd = {k[len("module."):]: v for k, v in full.items()}
    else:
        sd = {("module." if layout == "module_open_clip" else "") + k: v.clone() for k, v in small_ref.state_dict().items()}
    path = tmp_path / f"weights.{fmt}"
    if fmt == "pt":
        torch.save(sd, path)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    compare(latentclip.load(path), small_ref, torch.randn(2, 4, 64, 64), ["a cat"])


def test_file_name_does_not_matter(tmp_path, small_ckpt, small_ref):
    odd = tmp_path / "model.safetensors"  # a pickle behind a misleading name is still read as a pickle
    odd.write_bytes(small_ckpt.read_bytes())
    with pytest.raises(CheckpointError):
        latentclip.load(odd)  # .safetensors suffix: a pickle is refused unread, with a clear error
    plain = tmp_path / "weights.bin"
    plain.write_bytes(small_ckpt.read_bytes())
    compare(latentclip.load(plain), small_ref, torch.randn(1, 4, 64, 64), ["a cat"])


def test_convert_round_trip_and_no_overwrite(tmp_path, small_ckpt, small_ref):
    out = tmp_path / "small.safetensors"
    r = subprocess.run([sys.executable, "-m", "latentclip", "convert", str(small_ckpt), str(out)],
                       capture_output=True, text=True, cwd=ROOT, preexec_fn=lambda: os.umask(0o027))
    assert r.returncode == 0, r.stderr
    assert out.stat().st_mode & 0o777 == 0o640  # the umask's mode, not safetensors' private 0600
    assert [p.name for p in tmp_path.iterdir()] == ["small.safetensors"]  # no temp file left
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["vae_family"] == "sdxl" and json.loads(meta["config"])["embed_dim"] == 32
    assert not any("vae_encoder" in k or "latent_vit" in k for k in keys)
    compare(latentclip.load(out), small_ref, torch.randn(2, 4, 64, 64), ["a cat"])
    before = out.read_bytes()
    r = subprocess.run([sys.executable, "-m", "latentclip", "convert", str(small_ckpt), str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "refusing to overwrite" in r.stderr
    assert out.read_bytes() == before
    half = tmp_path / "half.safetensors"
    latentclip.convert(small_ckpt, half, dtype="fp16")
    assert half.stat().st_size < out.stat().st_size * 0.6
    m16 = latentclip.load(half)
    x = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        assert rel_err(m16.encode_latents(x), small_ref.encode_image(x)) < 1e-2


def test_shape_inference_and_config_mismatch(tmp_path, small_ckpt):
    cfg = latentclip.infer_config(latentclip.checkpoints.load_state_dict(small_ckpt)[0])
    assert cfg["vision_cfg"]["patch_size"] == 8 and cfg["vision_cfg"]["image_size"] == 512
    assert cfg["vision_cfg"]["layers"] == 2 and cfg["text_cfg"]["layers"] == 2
    assert cfg["text_cfg"]["heads"] == 1 and cfg["text_cfg"]["context_length"] == 77
    with pytest.raises(CheckpointError, match="config says"):
        latentclip.load(small_ckpt, config="Latent-ViT-B-8-512")


def test_heads_from_metadata(tmp_path, small_ref):
    cfg = latentclip.infer_config(small_ref.state_dict())
    cfg["text_cfg"]["heads"] = 4  # 16-wide heads: not inferable from shapes
    model = latentclip.LatentCLIP(cfg)
    model.load_open_clip_state_dict(small_ref.state_dict())
    path = latentclip.save(model, tmp_path / "h.safetensors")
    assert latentclip.load(path).config["text_cfg"]["heads"] == 4


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PAYLOAD_RAN",))


def test_pickle_with_code_is_refused_without_running(tmp_path, small_ref):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": small_ref.state_dict(), "x": Payload()}, path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(CheckpointError, match="refused"):
            latentclip.load(path)
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "PAYLOAD_RAN").exists()
    legacy = tmp_path / "evil_legacy.pt"
    with open(legacy, "wb") as f:
        pickle.dump(Payload(), f)
    with pytest.raises(CheckpointError):
        latentclip.load(legacy)
    assert not (tmp_path / "PAYLOAD_RAN").exists()


def test_foreign_and_broken_files(tmp_path, small_ckpt):
    pixel = open_clip.create_model("ViT-B-32", pretrained=None)
    torch.save(pixel.state_dict(), tmp_path / "pixel.pt")
    with pytest.raises(CheckpointError, match="pixel CLIP"):
        latentclip.load(tmp_path / "pixel.pt")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}, str(tmp_path / "sd.safetensors"))
    with pytest.raises(CheckpointError, match="Stable Diffusion"):
        latentclip.load(tmp_path / "sd.safetensors")
    data = small_ckpt.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        latentclip.load(tmp_path / "trunc.pt")
    good = tmp_path / "good.safetensors"
    latentclip.convert(small_ckpt, good)
    blob = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(blob[: len(blob) - 1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        latentclip.load(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        latentclip.load(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        latentclip.load(tmp_path / "missing.pt")


def test_convert_makes_the_output_folder_and_says_when_it_cannot(tmp_path, small_ckpt):
    """README's command runs in a ComfyUI that has no models/latent_clip yet."""
    out = tmp_path / "ComfyUI" / "models" / "latent_clip" / "latent-clip.safetensors"
    assert latentclip.convert(small_ckpt, out, dtype="fp16") == out and latentclip.load(out).vae_family == "sdxl"
    (tmp_path / "models-file").write_text("not a folder")
    with pytest.raises(CheckpointError, match=r"'.*models-file/x\.safetensors' could not be written \(.*\); expected a writable folder"):
        latentclip.convert(small_ckpt, tmp_path / "models-file" / "x.safetensors")
    assert (tmp_path / "models-file").read_text() == "not a folder"
    assert list(tmp_path.glob("**/*.tmp")) == []


@pytest.mark.parametrize("legacy", [False, True])
def test_a_pytorch_checkpoint_named_safetensors_is_told_to_rename_it(tmp_path, small_ref, legacy):
    """It got "corrupt safetensors header (declares 578712552184433488 header bytes ...)"."""
    odd = tmp_path / "epoch_34.safetensors"
    torch.save(authors_checkpoint(small_ref), odd, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match=r"^'epoch_34.safetensors' is a PyTorch checkpoint \(a zip/pickle\), "
                                              r"not a safetensors file; rename it to \.pt$"):
        latentclip.load(odd)
    renamed = tmp_path / "epoch_34.pt"
    odd.rename(renamed)
    compare(latentclip.load(renamed), small_ref, torch.randn(1, 4, 64, 64), ["a cat"])


def test_a_safetensors_file_named_pt_is_read_by_content(tmp_path, small_ckpt, small_ref):
    st = latentclip.convert(small_ckpt, tmp_path / "weights.safetensors")
    named_pt = tmp_path / "weights.pt"
    named_pt.write_bytes(st.read_bytes())
    compare(latentclip.load(named_pt), small_ref, torch.randn(1, 4, 64, 64), ["a cat"])


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_open_clips_attn_mask_buffer_is_dropped(tmp_path, small_ref, fmt):
    """The causal mask holds -inf above its diagonal; the finite check refused such a file."""
    ck = authors_checkpoint(small_ref)
    ck["state_dict"]["module.attn_mask"] = small_ref.attn_mask.clone()
    path = tmp_path / f"with_mask.{fmt}"
    if fmt == "pt":
        torch.save(ck, path)
    else:
        save_file({k: v.contiguous() for k, v in ck["state_dict"].items()}, str(path))
    compare(latentclip.load(path), small_ref, torch.randn(2, 4, 64, 64), ["a cat"])


def test_convert_keeps_the_source_metadata(tmp_path, small_ckpt):
    """convert wrote only format, config and vae_family: a distilled model's teacher and steps were lost."""
    from safetensors import safe_open

    def meta_of(path):
        with safe_open(str(path), "pt") as f:
            return f.metadata()

    model = latentclip.load(small_ckpt)
    assert model.metadata == {"epoch": "34", "name": "latent-clip-test"}
    assert {k: v for k, v in meta_of(latentclip.convert(small_ckpt, tmp_path / "a.safetensors")).items()
            if k in ("epoch", "name")} == {"epoch": "34", "name": "latent-clip-test"}
    extra = {"teacher": json.dumps({"model": "ViT-B-32"}), "steps": "1000", "data": "shards/", "distill": "{}"}
    distilled = latentclip.save(model, tmp_path / "distilled.safetensors", dtype="fp16", metadata=extra)
    want = meta_of(distilled)
    assert latentclip.load(distilled).metadata == want
    for dtype in (None, "fp32", "bf16"):
        out = latentclip.convert(distilled, tmp_path / f"converted_{dtype}.safetensors", dtype=dtype)
        assert meta_of(out) == want


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_loads_keep_logit_scale_and_bf16_text_exact(small_ckpt, dtype):
    """bf16 rounded every weight before casting the text tower back up: exp(logit_scale) 98.86, not 100."""
    full, low = latentclip.load(small_ckpt), latentclip.load(small_ckpt, dtype=dtype)
    assert low.dtype == dtype and low.logit_scale.dtype == torch.float32
    assert torch.equal(low.logit_scale.exp(), full.logit_scale.exp())
    texts = ["a cat", "a photo of a dog on grass"]
    x = torch.randn(1, 4, 64, 64)
    # the score's scale is exp(logit_scale) to float rounding (the bf16 bug put it 1.1% low)
    torch.testing.assert_close(latentclip.clip_score(low, x, texts[0]) / latentclip.cosine(low, x, texts[0]),
                               full.logit_scale.exp().expand(1), rtol=1e-5, atol=0)
    if dtype == torch.bfloat16:   # the text tower stays fp32: bit-identical text features
        assert all(p.dtype == torch.float32 for n, p in low.clip.named_parameters() if not n.startswith("visual."))
        with torch.no_grad():
            assert torch.equal(low.encode_text(texts), full.encode_text(texts))


@pytest.mark.parametrize("flag", ["set_overwrite_module_params_on_conversion", "set_swap_module_params_on_conversion"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_casts_keep_fp32_values_when_torch_replaces_parameters(small_ckpt, dtype, flag):
    """With torch's overwrite flag a cast makes new parameter objects and frees the old ones, whose ids get reused:
    fp32 values kept by id went to the wrong tensors (wrong shapes, exp(logit_scale) off)."""
    full = latentclip.load(small_ckpt)
    setter = getattr(torch.__future__, flag)
    getter = getattr(torch.__future__, flag.replace("set_", "get_"))
    before = getter()
    setter(True)
    try:
        low = latentclip.load(small_ckpt).to(dtype).to(torch.float16).to(dtype)
    finally:
        setter(before)
    shapes = {n: p.shape for n, p in full.clip.named_parameters()}
    assert {n: p.shape for n, p in low.clip.named_parameters()} == shapes
    assert low.logit_scale.dtype == torch.float32 and torch.equal(low.logit_scale, full.logit_scale)
    for name, p in low.clip.named_parameters():
        if ".ln" in name or name.startswith("ln_") or "ln_" in name.rpartition(".")[0].rpartition(".")[2]:
            assert p.dtype == torch.float32 and torch.equal(p, dict(full.clip.named_parameters())[name]), name
    x = torch.randn(1, 4, 64, 64)
    assert torch.isfinite(latentclip.clip_score(low, x, "a cat")).all()
