"""Heads on a CLIP embedding space (latentclip.heads) and the LatentHead reward term."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentclip import CheckpointError, InputError, LatentCLIP
from latentclip.heads import Head, latent_probabilities, load_head, save_head
from latentclip.rewards import LatentHead, RewardSum

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LatentCLIP("Latent-ViT-Tiny-test").eval()


def _head(model, hidden=8, seed=1):
    torch.manual_seed(seed)
    return Head(model.config["embed_dim"], ["calm", "busy", "odd"], hidden, "a test attribute", "tiny").eval()


def test_save_load_round_trip_keeps_labels_and_outputs(tmp_path, model):
    head = _head(model)
    path = save_head(head, tmp_path / "h.safetensors", {"seed": 1})
    again = load_head(path)
    assert again.labels == ["calm", "busy", "odd"] and again.what == "a test attribute" and again.space == "tiny"
    emb = torch.randn(5, model.config["embed_dim"])
    assert torch.allclose(head(emb), again(emb))
    assert torch.allclose(again.probabilities(emb).sum(-1), torch.ones(5))
    with pytest.raises(FileExistsError):
        save_head(head, path)


def test_latent_probabilities_go_through_the_latent_clip(model):
    head = _head(model, hidden=0)
    x = torch.randn(3, 4, 64, 64)
    before = x.clone()
    got = latent_probabilities(model, head, x)
    want = head.probabilities(model.encode_latents(before))
    assert torch.equal(x, before) and torch.allclose(got, want)


def test_a_head_of_another_width_or_an_unknown_label_is_one_clear_error(model):
    wrong = Head(model.config["embed_dim"] + 1, ["a", "b"])
    with pytest.raises(InputError, match="reads 33-dimensional embeddings but the Latent-CLIP makes 32"):
        latent_probabilities(model, wrong, torch.randn(1, 4, 64, 64))
    with pytest.raises(InputError, match="label 'nope' is not one of this head's labels"):
        LatentHead(model, _head(model), "nope")
    with pytest.raises(InputError, match="mode must be one of"):
        LatentHead(model, _head(model), "calm", mode="sideways")


@pytest.mark.parametrize("edit, message", [
    (lambda m, sd: m.update(format="something-else"), "is not a head file"),
    (lambda m, sd: m.update(labels="[1, 2]"), "'labels' that is not a list"),
    (lambda m, sd: m.update(embed_dim="10000000"), "'embed_dim'"),
    (lambda m, sd: sd.update({"net.0.weight": torch.zeros(3, 5)}), "does not fit its metadata"),
    (lambda m, sd: sd.update({"net.0.bias": torch.full((3,), float("nan"))}), "NaN or infinite"),
])
def test_a_bad_head_file_is_refused_naming_it(tmp_path, model, edit, message):
    path = save_head(_head(model, hidden=0), tmp_path / "good.safetensors")
    from latentclip.checkpoints import read_safetensors_header
    meta = dict(read_safetensors_header(path)["__metadata__"])
    sd = load_file(str(path))
    edit(meta, sd)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad), metadata=meta)
    with pytest.raises(CheckpointError, match=message) as e:
        load_head(bad)
    assert "bad.safetensors" in str(e.value)


def test_head_reward_raises_or_lowers_the_label_probability(model):
    head = _head(model)
    x = torch.randn(2, 4, 64, 64)
    p0 = latent_probabilities(model, head, x)[:, 1]
    for mode, sign in (("increase", 1), ("decrease", -1)):
        term = LatentHead(model, head, "busy", mode=mode, weight=1.0)
        loss, metrics = term.evaluate(x)
        assert loss.shape == (2,) and torch.allclose(metrics["p"], p0, atol=1e-6)
        want = -torch.log(p0) if mode == "increase" else -torch.log1p(-p0)
        assert torch.allclose(loss, want, atol=1e-5)
        z = x.clone().requires_grad_(True)
        g, = torch.autograd.grad(term.loss(z).sum(), z)
        with torch.no_grad():
            p1 = latent_probabilities(model, head, x - 0.5 * g / g.norm())[:, 1]
        assert (sign * (p1 - p0) > 0).all(), (mode, p0, p1)
    total, values = RewardSum([LatentHead(model, head, "odd", weight=0.5)]).evaluate(x)
    assert set(values) == {"head", "head/p"} and total.shape == (2,)


def test_decrease_keeps_pushing_a_confident_head(model):
    """-log(1 - p) from the other labels' log-mass: no clamp that would zero the gradient near p = 1."""
    head = _head(model)
    last = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias.zero_()
        last.bias[head.label_index("busy")] = 20.0                  # p(busy) about 1 - 4e-9: a confident head
    term = LatentHead(model, head, "busy", mode="decrease", weight=1.0)
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    loss, values = term.evaluate(x)
    assert (values["p"] > 1 - 1e-6).all()
    loss.sum().backward()
    assert x.grad.abs().sum() > 0                                   # the clamp gave exactly 0 here


def _rewritten(tmp_path, head, labels=None, change=lambda sd: sd):
    """``head`` saved, then written again with other metadata labels and/or changed tensors."""
    from latentclip.checkpoints import read_safetensors_header
    path = save_head(head, tmp_path / "good.safetensors")
    meta = dict(read_safetensors_header(path)["__metadata__"])
    if labels is not None:
        meta["labels"] = json.dumps(labels)
    bad = tmp_path / "bad.safetensors"
    save_file(change(load_file(str(path))), str(bad), metadata=meta)
    return bad


@pytest.mark.parametrize("labels, change, message", [
    (["calm", "busy"], lambda sd: sd, "its output layer has 3 rows but the metadata lists 2 labels"),
    (None, lambda sd: {**sd, "net.0.weight": torch.zeros(8, 31)}, r"'net.0.weight' has shape \[8, 31\], expected \[8, 32\]"),
    (None, lambda sd: {**sd, "net.0.bias": torch.zeros(9)}, r"'net.0.bias' has shape \[9\], expected \[8\]"),
    (None, lambda sd: {k: v for k, v in sd.items() if k != "net.2.bias"}, "it lacks 'net.2.bias'"),
])
def test_a_head_that_does_not_fit_its_metadata_names_the_tensor(tmp_path, model, labels, change, message):
    """The old message listed the first two tensors of each side, identical here ('have' == 'expected')."""
    with pytest.raises(CheckpointError, match=message) as e:
        load_head(_rewritten(tmp_path, _head(model, hidden=8), labels, change))
    assert str(e.value).startswith("'bad.safetensors' ") and "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_a_head_with_tensors_that_are_not_floats_is_refused(tmp_path, model, dtype):
    """An int32 head loaded silently as float weights; the model loader refuses these too."""
    bad = _rewritten(tmp_path, _head(model, hidden=0), change=lambda sd: {k: (v * 1000).to(dtype) for k, v in sd.items()})
    with pytest.raises(CheckpointError, match=rf"'bad.safetensors' stores 'net.0.bias' as {str(dtype)[6:]}; "
                                              "expected floating-point weights"):
        load_head(bad)
