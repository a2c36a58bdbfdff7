"""Pixel-CLIP files and names are data: no name reaches the network, a malformed file is a CheckpointError."""
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from latentclip.errors import CheckpointError
from latentclip.pixel_clip import check_model_name, load_pixel_clip


@pytest.fixture
def tiny_vit_file(tmp_path):
    """A real open_clip ViT-B-32 state dict would be 600 MB; its shapes at rank-corrupted keys suffice here."""
    sd = {"visual.conv1.weight": torch.zeros(8, 3, 4, 4), "visual.positional_embedding": torch.zeros(5, 8),
          "visual.proj": torch.zeros(8, 4), "token_embedding.weight": torch.zeros(10, 8),
          "positional_embedding": torch.zeros(7, 8)}
    return tmp_path, sd


@pytest.mark.parametrize("name", ["hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "/etc/passwd", "ViT-H-14 ",
                                  "../ViT-B-32", "local-dir:/tmp"])
def test_names_that_would_reach_outside_are_refused(name, no_network, tmp_path):
    with pytest.raises(CheckpointError, match="model_name .* is not an open_clip architecture"):
        load_pixel_clip(tmp_path / "never_read.safetensors", model_name=name)
    assert no_network == []


def test_built_in_names_are_accepted():
    assert check_model_name("ViT-B-32") == "ViT-B-32"
    assert "ViT-H-14" in open_clip.list_models()


def test_tensors_of_the_wrong_rank_are_a_checkpoint_error(tiny_vit_file, no_network):
    folder, sd = tiny_vit_file
    sd["visual.proj"] = torch.zeros(8)            # rank 1: reading its embed width used to raise IndexError
    path = folder / "broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="not an open_clip ViT CLIP"):
        load_pixel_clip(path)
