"""Issue 21, items 6 and 8 (core): non-finite results fail closed, fp16 does not overflow on large
latents, one prompt per line means "\\n" only, zero-shot templates hold exactly one "{}", and an
all-zero checkpoint is refused."""
import pytest
import torch

import latentclip
from latentclip import scoring
from latentclip.errors import CheckpointError, InputError
from latentclip.model import LatentCLIP


def _tiny(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = LatentCLIP("Latent-ViT-Tiny-test").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.to(dtype)


# -- item 8: lines and templates ------------------------------------------------------------------
@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"])
def test_only_newline_separates_prompts(sep):
    assert scoring.split_lines(f"a cat{sep}on a mat") == [f"a cat{sep}on a mat"]
    assert scoring.split_lines(f"a cat{sep}on a mat\na dog\r\n\n") == [f"a cat{sep}on a mat", "a dog"]


def test_blank_lines_and_crlf_still_work():
    assert scoring.split_lines("  a\r\n\n b \n") == ["a", "b"]
    with pytest.raises(InputError, match="text is empty"):
        scoring.split_lines("\u2028 \n \x85")


@pytest.mark.parametrize("template", ["{} and {}", "a photo of {label}", "{0}", "a {x}", "{!r}", "{:>10}",
                                      "a photo of {", "a photo of }", "{{}}", "a photo", ""])
def test_template_must_hold_exactly_one_plain_placeholder(template):
    with pytest.raises(InputError) as e:
        scoring.check_template(template)
    message = str(e.value)
    assert message.startswith(f"template {template!r}") and "'{}'" in message and "\n" not in message


def test_template_error_comes_from_zero_shot_not_a_raw_exception():
    with pytest.raises(InputError, match="2 placeholders; expected .* exactly once"):
        scoring.zero_shot(_tiny(), torch.randn(1, 4, 64, 64), ["cat", "dog"], "{} and {}")


@pytest.mark.parametrize("template, want", [("a photo of {}", "a photo of cat"), ("{}", "cat"),
                                            ("a {{styled}} {}", "a {styled} cat")])
def test_good_templates_fill_the_label(template, want):
    assert scoring.check_template(template).format("cat") == want


# -- item 6: fp16 overflow and non-finite results ---------------------------------------------------
@pytest.mark.parametrize("magnitude", [3e4, 1e5, 1e8])
def test_fp16_tower_stays_finite_on_large_latents(magnitude):
    """The half-precision patch embedding overflowed (conv1 output > 65504, or the latent itself cast to
    fp16) and every later feature became NaN; the stem runs in fp32 and ln_pre brings it back to scale."""
    fp32 = _tiny()
    fp16 = _tiny().half()
    x = torch.randn(2, 4, 64, 64) * magnitude
    with torch.no_grad():
        half = fp16.encode_latents(x).float()
        full = fp32.encode_latents(x)
    assert torch.isfinite(half).all()
    assert torch.nn.functional.cosine_similarity(half, full).min() > 0.99
    probs = scoring.concept_probabilities(fp16, x, ["nudity"])
    assert torch.isfinite(probs).all()


def test_fp16_stem_keeps_gradients_and_dtype():
    fp16 = _tiny().half()
    assert fp16.dtype == torch.float16
    x = (torch.randn(1, 4, 64, 64) * 1e5).requires_grad_(True)
    fp16.encode_latents(x).float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    back = fp16.float()
    assert back.dtype == torch.float32 and back.encode_latents(torch.randn(1, 4, 64, 64)).dtype == torch.float32


def _overflowing(model):
    """Latents finite in fp32 whose features still overflow: the fail-closed paths must see NaN."""
    return torch.full((2, 4, 64, 64), 3e38)


def test_concept_probabilities_return_nan_for_the_filter_to_flag():
    model = _tiny()
    x = torch.cat([torch.randn(1, 4, 64, 64), _overflowing(model)[:1]])
    probs = scoring.concept_probabilities(model, x, ["nudity"])
    assert torch.isfinite(probs[0]).all() and not torch.isfinite(probs[1]).any()


@pytest.mark.parametrize("call", ["cosine", "clip_score", "rank", "zero_shot"])
def test_scores_never_pass_nan_on_silently(call):
    model = _tiny()
    x = torch.cat([torch.randn(1, 4, 64, 64), _overflowing(model)[:1]])
    run = {"cosine": lambda: scoring.cosine(model, x, "a cat"),
           "clip_score": lambda: scoring.clip_score(model, x, "a cat"),
           "rank": lambda: scoring.rank(model, x, "a cat", k=1),
           "zero_shot": lambda: scoring.zero_shot(model, x, ["cat", "dog"])}[call]
    with pytest.raises(InputError) as e:
        run()
    message = str(e.value)
    assert "samples #1" in message and "not finite" in message and "\n" not in message


# -- item 8: all-zero checkpoints ---------------------------------------------------------------------
@pytest.mark.parametrize("part", ["all", "visual", "text"])
def test_all_zero_checkpoint_is_refused(tmp_path, part):
    model = _tiny()
    with torch.no_grad():
        for name, p in model.clip.named_parameters():
            if name == "logit_scale":
                continue
            if part == "all" or (part == "visual") == name.startswith("visual."):
                p.zero_()
    path = latentclip.save(model, tmp_path / f"zero-{part}.safetensors")
    with pytest.raises(CheckpointError) as e:
        latentclip.load(path)
    assert f"zero-{part}.safetensors" in str(e.value) and "zero" in str(e.value)
    assert "\n" not in str(e.value)
