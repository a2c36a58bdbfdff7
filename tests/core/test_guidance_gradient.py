"""Safety guidance keeps the gradient path of what it moves (ReNO through a guided model optimises).

The guidance step is added to x0 as a constant, so d(new x0)/d(x0) is the identity for every item,
guided or not. The ReNO check runs a one-step "generator" whose output passes through a guidance
step, with the regulariser off: if guidance cut the graph, the noise would get no gradient at all and
the loss could not move.
"""
import math

import torch

from latentclip import LatentCLIP, LatentMatch, reno_optimize
from latentclip.guidance import safety_guidance

torch.set_num_threads(1)


def tiny_model():
    torch.manual_seed(0)
    model = LatentCLIP("Latent-ViT-Tiny-test").eval().requires_grad_(False)
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(100.0))
    return model


def test_the_guided_output_has_an_identity_jacobian_in_x0():
    model = tiny_model()
    concept = model.encode_text_cached(["a dog"])
    x0 = torch.randn(3, 4, 64, 64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    new, stats = safety_guidance(x0 * 1.0, model, concept, sigma=torch.tensor([10.0, 10.0, 0.0]), scale=0.1)
    assert stats.fired == [True, True, False]                  # sigma 0: the last item is not guided
    assert new.requires_grad and not torch.equal(new[:2], x0[:2].detach())
    weights = torch.randn_like(new)
    (new * weights).sum().backward()
    assert torch.equal(x0.grad, weights)                        # identity, for guided and unguided items


def test_reno_through_a_guided_generator_lowers_the_reward_loss():
    model = tiny_model()
    concept = model.encode_text_cached(["a dog"])
    fired = []

    def guided_generator(z):
        x0 = 0.8 * z                                            # stands in for a one-step model
        new, stats = safety_guidance(x0, model, concept, sigma=10.0, scale=0.1)
        fired.extend(stats.fired)
        return new

    noise = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(2))
    result = reno_optimize(guided_generator, noise, LatentMatch(model, ["a red fox"], weight=0.01),
                           iterations=5, lr=5.0, regularization=0.0, seed=0)
    assert fired and all(fired)                                 # guidance moved every output it saw
    assert all(b < i for b, i in zip(result.best_loss, result.initial_loss)), (result.best_loss, result.initial_loss)
    assert all(it >= 1 for it in result.best_iteration)
    assert not torch.equal(result.noise, result.initial_noise)
