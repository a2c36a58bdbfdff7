"""Review 1206e (model, pixel CLIP, families): bugs found and fixed, one test each."""
import copy

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from latentclip import InputError, LatentCLIP
from latentclip.errors import CheckpointError
from latentclip.families import check_latents_for_family
from latentclip.pixel_clip import _signature_from_config, check_model_name, infer_model_name, load_pixel_clip

from fake_device import FakeDeviceTensor, fake_device, to_device


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LatentCLIP("Latent-ViT-Tiny-test").eval()


def test_tokens_made_on_the_cpu_reach_a_model_on_the_gpu(model):
    """encode_text takes "an already tokenised LongTensor", but left it where it was: tokens from
    open_clip.tokenize (CPU) with the model on a GPU failed in the embedding ("Expected all tensors to be on
    the same device")."""
    tokens = open_clip.tokenize(["a cat", "a dog"])
    with torch.no_grad():
        want = model.encode_text(tokens)
    on_device = to_device(copy.deepcopy(model, memo={id(model.tokenizer): model.tokenizer}))
    with fake_device(), torch.no_grad():
        got = on_device.encode_text(tokens)
        assert isinstance(got, FakeDeviceTensor)
        got = got.cpu()
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("name", ["ViT-B-16-SigLIP", "ViT-L-14-CLIPA", "roberta-ViT-B-32", "xlm-roberta-base-ViT-B-32"])
def test_built_in_names_whose_text_side_comes_from_hugging_face_are_refused(name, no_network):
    """check_model_name promises that nothing is downloaded, but accepted every built-in name: the pixel reward's
    model_name "ViT-B-16-SigLIP" or "ViT-L-14-CLIPA" fetched a Hugging Face tokenizer and "roberta-ViT-B-32" a
    whole Hugging Face text model (offline: an OSError from transformers instead of a sentence)."""
    with pytest.raises(CheckpointError, match=rf"model_name '{name}' .*Hugging Face") as e:
        check_model_name(name)
    assert "\n" not in str(e.value)
    assert no_network == []


def test_loading_with_a_hugging_face_text_model_name_never_reaches_the_network(tmp_path, no_network):
    path = tmp_path / "clip.safetensors"
    save_file({"visual.conv1.weight": torch.zeros(8, 3, 4, 4)}, str(path))
    with pytest.raises(CheckpointError, match="Hugging Face"):
        load_pixel_clip(path, model_name="roberta-ViT-B-32")
    assert no_network == []


def _meta_state_dict(cfg: dict) -> dict:
    """The tensors infer_model_name reads, with the shapes of open_clip config ``cfg`` (meta: no memory)."""
    sig = _signature_from_config(cfg)
    meta = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
    grid = sig["image"] // sig["patch"]
    sd = {"visual.conv1.weight": meta(sig["width"], 3, sig["patch"], sig["patch"]),
          "visual.positional_embedding": meta(grid * grid + 1, sig["width"]),
          "visual.proj": meta(sig["width"], sig["embed"]),
          "token_embedding.weight": meta(cfg["text_cfg"]["vocab_size"], sig["text_width"]),
          "positional_embedding": meta(sig["context"], sig["text_width"])}
    sd.update({f"visual.transformer.resblocks.{i}.ln_1.weight": meta(sig["width"]) for i in range(sig["layers"])})
    sd.update({f"transformer.resblocks.{i}.ln_1.weight": meta(sig["text_width"]) for i in range(sig["text_layers"])})
    return sd


def test_a_file_shaped_like_a_hugging_face_tokenizer_model_is_not_inferred_as_it():
    """A CLIPA ViT-L-14 file was inferred as "ViT-L-14-CLIPA", whose tokenizer (bert-base-uncased) open_clip
    downloads: the file's shapes alone sent the loader to the network."""
    sd = _meta_state_dict(open_clip.get_model_config("ViT-L-14-CLIPA"))
    with pytest.raises(CheckpointError, match="ViT-L-14-CLIPA.*Hugging Face") as e:
        infer_model_name(sd)
    assert "\n" not in str(e.value)
    # a plain architecture is still inferred
    assert infer_model_name(_meta_state_dict(open_clip.get_model_config("ViT-B-32"))) == "ViT-B-32"


@pytest.mark.parametrize("dtype", [torch.complex64, torch.bool, torch.uint8, torch.int64])
def test_latents_that_are_not_floating_point_are_one_clear_sentence(model, dtype):
    """A complex tensor lost its imaginary part with only a warning, and an integer or bool tensor (a uint8
    RGBA image wired in as latents) was scored as if it were a latent."""
    x = torch.ones(1, 4, 64, 64, dtype=dtype)
    with pytest.raises(InputError, match=rf"^latents holds {dtype} values; expected floating-point raw VAE latents") as e:
        model.encode_latents(x)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="samples holds"):
        check_latents_for_family(x, "sdxl")
    assert model.encode_latents(torch.ones(1, 4, 64, 64, dtype=torch.float64)).shape == (1, 32)
