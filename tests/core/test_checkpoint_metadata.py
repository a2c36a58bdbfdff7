"""A checkpoint's metadata is data, never instructions; colliding keys are refused.

The hostile files are the ones a user found (issue 15): a metadata ``config`` naming a Hugging Face
text model or pretrained timm weights, ``attentional_pool`` with two million queries, a config that
is not JSON, a file holding both ``logit_scale`` and ``clip.logit_scale``. Each must be refused with a
CheckpointError naming the file and the problem, with no network attempt, before any tensor data is
read and before a model is built (both are spied on).
"""
import json
import socket

import pytest
import torch
from safetensors.torch import save_file

import latentclip
from latentclip import CheckpointError, checkpoints, configs


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = latentclip.LatentCLIP("Latent-ViT-Tiny-test")
    return {k: v.contiguous() for k, v in model.open_clip_state_dict().items() if k != "attn_mask"}


@pytest.fixture
def spies(monkeypatch):
    """Records tensor reads (safe_open) and model builds (LatentCLIP) during a load."""
    seen = {"reads": 0, "builds": 0}
    real_open, real_model = checkpoints.safe_open, checkpoints.LatentCLIP

    def counting_open(*a, **k):
        seen["reads"] += 1
        return real_open(*a, **k)

    def counting_model(*a, **k):
        seen["builds"] += 1
        return real_model(*a, **k)

    monkeypatch.setattr(checkpoints, "safe_open", counting_open)
    monkeypatch.setattr(checkpoints, "LatentCLIP", counting_model)
    return seen


def tiny_config():
    return configs.get_config("Latent-ViT-Tiny-test")


def write(path, tensors, **metadata):
    save_file(tensors, str(path), metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    return path


def with_change(change):
    cfg = tiny_config()
    change(cfg)
    return cfg


HOSTILE = {
    "hf-text": (with_change(lambda c: c["text_cfg"].update(hf_model_name="org/some-text-model", hf_tokenizer_name="org/tok")),
                "text_cfg.hf_model_name is not allowed (would download a Hugging Face text model)"),
    "timm": (with_change(lambda c: c["vision_cfg"].update(timm_model_name="vit_base_patch16_224", timm_model_pretrained=True)),
             "vision_cfg.timm_model_name is not allowed"),
    "attn-pool": (with_change(lambda c: c["vision_cfg"].update(attentional_pool=True, attn_pooler_queries=2_000_000)),
                  "vision_cfg.attentional_pool is not allowed"),
    "layer-scale": (with_change(lambda c: c["text_cfg"].update(ls_init_value=1e-5)), "text_cfg.ls_init_value is not allowed"),
    "top-level": (with_change(lambda c: c.update(custom_text=True)), "custom_text is not allowed"),
    "decoding-layers": (with_change(lambda c: c["vision_cfg"].update(latent_n_decoding_layers=2)),
                        "partially decoded variants need VAE decoder layers"),
    "huge-width": (with_change(lambda c: c["vision_cfg"].update(width=10**9)), "vision_cfg.width is 1000000000; expected an integer in [1, 16384]"),
    "bool-layers": (with_change(lambda c: c["text_cfg"].update(layers=True)), "text_cfg.layers is true; expected an integer"),
    "nan-ratio": (with_change(lambda c: c["text_cfg"].update(mlp_ratio=float("nan"))), "text_cfg.mlp_ratio is NaN; expected a number in (0.0, 64.0]"),
    "huge-int-ratio": (with_change(lambda c: c["text_cfg"].update(mlp_ratio=10**400)), "text_cfg.mlp_ratio is 1000000000"),
    "string-heads": (with_change(lambda c: c["text_cfg"].update(heads="8")), 'text_cfg.heads is "8"; expected an integer'),
    "family": (with_change(lambda c: c.update(vae_family="../../etc")), "vae_family \"../../etc\" is unknown"),
    "list": ([1, 2, 3], "the config is list; expected a JSON object"),
    "no-text": (with_change(lambda c: c.pop("text_cfg")), "text_cfg is missing"),
    "heads-mismatch": (with_change(lambda c: c["text_cfg"].update(heads=3)), "text_cfg width 64 cannot be split into attention heads of 3 heads"),
    "shape-mismatch": (with_change(lambda c: c["vision_cfg"].update(layers=5)), "the config says vision_cfg.layers=5 but the weights have vision_cfg.layers=2"),
    "not-json": ("{'embed_dim': 32,", "the config is not valid JSON"),
    "too-long": (" " * (configs.MAX_CONFIG_CHARS + 1), "characters long; expected at most"),
    "deep": ("[" * 50_000, "not valid JSON"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_metadata_config_is_refused_before_reading_or_building(tmp_path, tiny, no_network, spies, name):
    config, words = HOSTILE[name]
    path = write(tmp_path / f"{name}.safetensors", tiny, format="latentclip",
                 config=config if isinstance(config, str) else json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        latentclip.load(path)
    message = str(info.value)
    assert message.startswith(f"'{name}.safetensors' ") and words in message, message
    assert "\n" not in message
    assert no_network == [] and spies == {"reads": 0, "builds": 0}


def test_the_network_guard_and_spies_can_fail(tmp_path, tiny, no_network, spies):
    with pytest.raises(AssertionError, match="network access attempted"):
        socket.create_connection(("127.0.0.1", 9))
    assert len(no_network) == 1
    latentclip.load(write(tmp_path / "good.safetensors", tiny, config=tiny_config()))
    assert spies == {"reads": 1, "builds": 1}


@pytest.mark.parametrize("key, value, words", [
    ("vae_family", "mars", "vae_family \"mars\" is unknown"),
    ("latent_factor", "1e9", "latent_factor is \"1e9\"; expected an integer in [1, 64]"),
])
def test_other_metadata_values_are_checked(tmp_path, tiny, spies, key, value, words):
    path = write(tmp_path / "m.safetensors", tiny, **{key: value})
    with pytest.raises(CheckpointError, match="'m.safetensors'") as info:
        latentclip.load(path)
    assert words in str(info.value) and spies == {"reads": 0, "builds": 0}


def test_the_authors_configs_and_the_shipped_ones_are_accepted(tmp_path, tiny):
    for name in configs.list_configs():
        configs.validate_config(configs.get_config(name))
    authors = {"embed_dim": 32,
               "vision_cfg": {"image_size": 512, "layers": 2, "width": 64, "patch_size": 8,
                              "latent_encoder_name": "madebyollin/sdxl-vae-fp16-fix", "latent_factor": 8,
                              "latent_n_channels": 4},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}
    model = latentclip.load(write(tmp_path / "authors.safetensors", tiny, config=authors))
    assert model.config["vision_cfg"]["latent_encoder_name"] == "madebyollin/sdxl-vae-fp16-fix"
    assert torch.equal(model.clip.visual.conv1.weight, tiny["visual.conv1.weight"])
    (tmp_path / "authors.json").write_text(json.dumps(authors))
    latentclip.load(tmp_path / "authors.safetensors", config=str(tmp_path / "authors.json"))


def test_an_explicit_config_goes_through_the_same_allowlist(tmp_path, tiny, no_network):
    path = write(tmp_path / "plain.safetensors", tiny)
    bad = with_change(lambda c: c["text_cfg"].update(hf_model_name="org/model"))
    with pytest.raises(CheckpointError, match=r"'plain.safetensors' cannot be loaded with the config: text_cfg.hf_model_name"):
        latentclip.load(path, config=bad)
    (tmp_path / "broken.json").write_text("{nope")
    with pytest.raises(CheckpointError, match="could not be read as JSON"):
        latentclip.load(path, config=str(tmp_path / "broken.json"))
    assert no_network == []


@pytest.mark.parametrize("first, second", [
    ("logit_scale", "clip.logit_scale"),
    ("visual.proj", "module.visual.proj"),
    ("visual.conv1.weight", "visual.latent_vit.conv1.weight"),
    ("token_embedding.weight", "_orig_mod.module.token_embedding.weight"),
])
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_keys_that_collide_after_normalisation_are_refused_naming_both(tmp_path, tiny, first, second, fmt):
    tensors = dict(tiny)
    tensors[second] = tensors[first].clone() + 1
    path = tmp_path / f"twice.{fmt}"
    if fmt == "pt":
        torch.save(tensors, path)
    else:
        save_file(tensors, str(path))
    with pytest.raises(CheckpointError) as info:
        latentclip.load(path)
    message = str(info.value)
    assert f"'twice.{fmt}' holds both" in message and repr(first) in message and repr(second) in message, message


@pytest.mark.parametrize("change, words", [
    (lambda t: t.update({"visual.proj": t["visual.proj"].to(torch.int32)}), "stores 'visual.proj' as int32; expected floating-point"),
    (lambda t: t["ln_final.weight"].__setitem__(3, float("nan")), "NaN or infinite values in 'ln_final.weight'"),
    (lambda t: t.update({"visual.ln_pre.bias": torch.zeros(65)}), "stores 'visual.ln_pre.bias' with shape [65]; its config needs [64]"),
    (lambda t: t.pop("transformer.resblocks.1.ln_2.bias"), "missing ['transformer.resblocks.1.ln_2.bias']"),
    (lambda t: t.update({"visual.extra": torch.zeros(2)}), "unexpected ['visual.extra']"),
    (lambda t: t.update({"visual.conv1.weight": torch.zeros(64, 4, 8, 4)}), "8x4 kernel; expected square patches"),
    (lambda t: t.update({"positional_embedding": torch.zeros(77)}), "'positional_embedding' has shape [77]; expected 2"),
])
def test_tensors_that_do_not_fit_are_refused_naming_them(tmp_path, tiny, change, words):
    tensors = {k: v.clone() for k, v in tiny.items()}
    change(tensors)
    path = write(tmp_path / "odd.safetensors", tensors)
    with pytest.raises(CheckpointError, match="'odd.safetensors'") as info:
        latentclip.load(path)
    assert words in str(info.value), str(info.value)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_every_floating_dtype_loads_as_stored(tmp_path, tiny, dtype):
    stored = {k: v.to(dtype) for k, v in tiny.items()}
    model = latentclip.load(write(tmp_path / "typed.safetensors", stored))
    got = model.open_clip_state_dict()
    assert all(torch.equal(got[k], v.to(torch.float32)) for k, v in stored.items())


@pytest.mark.parametrize("kind, make", [("sparse_coo", lambda t: t.to_sparse()),
                                        ("meta", lambda t: torch.empty(t.shape, device="meta"))])
def test_a_pickle_with_tensors_that_are_not_dense_is_refused(tmp_path, tiny, kind, make):
    path = tmp_path / "odd.pt"
    torch.save({**tiny, "visual.proj": make(tiny["visual.proj"])}, path)
    with pytest.raises(CheckpointError, match=f"'odd.pt' stores 'visual.proj' as a {kind} tensor; expected plain dense"):
        latentclip.load(path)
