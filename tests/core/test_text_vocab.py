"""A Latent-CLIP whose token table is smaller than its tokenizer's ids is refused in one sentence when asked
for text (on a GPU the lookup would end the process with a device-side assert), and token tensors outside the
table are refused by the same check; a normal model's text path is unchanged."""
import pytest
import torch

from latentclip import InputError
from latentclip.configs import get_config
from latentclip.model import LatentCLIP

torch.set_num_threads(1)


def _model(vocab: int) -> LatentCLIP:
    cfg = get_config("Latent-ViT-Tiny-test")
    cfg["text_cfg"]["vocab_size"] = vocab
    return LatentCLIP(cfg).eval()


def test_a_token_table_smaller_than_the_tokenizer_is_refused_naming_vocab_size():
    model = _model(64)
    with pytest.raises(InputError, match=r"holds 64 tokens \(text_cfg.vocab_size\).*ids up to 49407"):
        model.encode_text(["a red circle"])
    ok = torch.randint(0, 64, (2, model.context_length))
    assert model.encode_text(ok).shape[0] == 2          # ids inside the table still encode


@pytest.mark.parametrize("bad", [64, -1])
def test_token_ids_outside_the_table_are_refused(bad):
    model = _model(64)
    tokens = torch.zeros(1, model.context_length, dtype=torch.long)
    tokens[0, 3] = bad
    with pytest.raises(InputError, match=r"ids in \[0, 63\].*vocab_size 64"):
        model.encode_text(tokens)


def test_a_full_token_table_encodes_text_and_its_own_tokens_alike():
    model = _model(49408)
    with torch.no_grad():
        a = model.encode_text(["a red circle"])
        b = model.encode_text(model.tokenize(["a red circle"]))
    assert torch.equal(a, b)
