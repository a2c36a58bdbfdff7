"""The mini generator: text -> 8x8x4 mini-VAE latents, the role SDXL-Turbo plays in the paper.

A rectified flow (x_t = (1 - t) x0 + t noise, the network predicts v = noise - x0) on per-channel
standardised latents, sampled deterministically from Gaussian noise in a few Euler steps with
classifier-free guidance. Everything is plain torch, so ``sample`` is differentiable from the
noise to the raw latents: ReNO backpropagates through all the steps (one step of a plain flow
model is far too weak, see docs/miniworld_part2.md).

Text goes through a small encoder of its own (word tokens of the grammar -> 2 transformer
layers), as SD uses a text encoder: its pooled output modulates every block (AdaGN) and its token
sequence feeds one cross-attention layer. The condition is dropped (the empty prompt) 10% of the
time in training so that guidance has an unconditional branch.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from . import scenes as S
from ..checkpoints import write_safetensors
from .files import build_from_metadata, read_tagged
from ..errors import InputError

FORMAT = "latentclip-mini-generator"
FILE = "generator.safetensors"
#: Every word of the grammar; index 0 pads, 1 is the pooled (CLS) slot.
VOCAB = ("<pad>", "<cls>", "a", "an", "one", "two", "three", *S.COLORS, *S.SHAPES,
         *(S.plural(s) for s in S.SHAPES), "object", "to", "the", "left", "right", "of", "above", "below")
CONTEXT = 12
CONFIG = {"channels": 96, "blocks": 4, "text_width": 64, "text_layers": 2, "cond_dim": 128}
#: The shipped generator's training recipe (``train_generator``).
RECIPE = {"steps": 1200, "batch": 128, "lr": 2e-3, "warmup": 50, "pool": 24000, "drop_cond": 0.1,
          "ema": 0.995, "full_caption_prob": 0.7}
#: Default sampling: Euler steps and guidance scale (feasibility: 4-8 steps workable).
STEPS, CFG = 4, 1.0


def tokenize(prompts) -> torch.Tensor:
    """Word tokens [B, CONTEXT] (CLS first, then the words, then padding); InputError on others."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    out = torch.zeros(len(prompts), CONTEXT, dtype=torch.long)
    index = {w: i for i, w in enumerate(VOCAB)}
    for row, p in enumerate(prompts):
        words = str(p).lower().replace(",", " ").replace(".", " ").split()
        if len(words) > CONTEXT - 1:
            raise InputError(f"prompt {p!r} has {len(words)} words; the mini generator reads at most {CONTEXT - 1}")
        unknown = [w for w in words if w not in index]
        if unknown:
            raise InputError(f"prompt {p!r} uses {unknown[0]!r}, which is not a word of the mini-world grammar")
        out[row, 0] = 1
        out[row, 1:1 + len(words)] = torch.tensor([index[w] for w in words], dtype=torch.long)
    return out


class TextEncoder(nn.Module):
    def __init__(self, width: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), width)
        self.pos = nn.Parameter(torch.randn(1, CONTEXT, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor):
        pad = tokens == 0
        h = self.norm(self.layers(self.embed(tokens) + self.pos, src_key_padding_mask=pad))
        return h, h[:, 0], pad


class Block(nn.Module):
    """Residual conv block whose group norms are modulated by the condition (AdaGN)."""

    def __init__(self, ch: int, cond: int):
        super().__init__()
        self.n1, self.n2 = nn.GroupNorm(8, ch, affine=False), nn.GroupNorm(8, ch, affine=False)
        self.c1, self.c2 = nn.Conv2d(ch, ch, 3, padding=1), nn.Conv2d(ch, ch, 3, padding=1)
        self.mod = nn.Linear(cond, 4 * ch)
        nn.init.zeros_(self.c2.weight)
        nn.init.zeros_(self.c2.bias)

    def forward(self, x, c):
        s1, b1, s2, b2 = self.mod(c)[:, :, None, None].chunk(4, dim=1)
        h = self.c1(F.silu(self.n1(x) * (1 + s1) + b1))
        return x + self.c2(F.silu(self.n2(h) * (1 + s2) + b2))


class CrossAttention(nn.Module):
    def __init__(self, ch: int, text: int):
        super().__init__()
        self.norm = nn.GroupNorm(8, ch)
        self.attn = nn.MultiheadAttention(ch, 4, kdim=text, vdim=text, batch_first=True)

    def forward(self, x, seq, pad):
        b, c, h, w = x.shape
        q = self.norm(x).flatten(2).transpose(1, 2)
        out, _ = self.attn(q, seq, seq, key_padding_mask=pad, need_weights=False)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


def _time_features(t: torch.Tensor, dim: int = 64) -> torch.Tensor:
    freqs = torch.exp(-math.log(1000.0) * torch.arange(dim // 2, dtype=torch.float32, device=t.device) / (dim // 2))
    a = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([a.sin(), a.cos()], dim=-1)


class MiniGenerator(nn.Module):
    """Velocity network plus sampler; ``latent_mean``/``latent_std`` map to raw mini-VAE latents."""

    def __init__(self, config: dict | None = None):
        super().__init__()
        self.config = dict(config or CONFIG)
        ch, cd, tw = self.config["channels"], self.config["cond_dim"], self.config["text_width"]
        #: latent channels: 4 for the mini VAE (the shipped config has no key), 16 for mini16's
        self.latent_channels = lc = int(self.config.get("latent_channels", 4))
        self.text = TextEncoder(tw, self.config["text_layers"])
        self.time = nn.Sequential(nn.Linear(64, cd), nn.SiLU(), nn.Linear(cd, cd))
        self.text_proj = nn.Linear(tw, cd)
        self.inp = nn.Conv2d(lc, ch, 3, padding=1)
        self.pos = nn.Parameter(torch.randn(1, ch, 8, 8) * 0.02)
        n = self.config["blocks"]
        self.blocks = nn.ModuleList(Block(ch, cd) for _ in range(n))
        self.xattn = nn.ModuleList(CrossAttention(ch, tw) for _ in range(2))
        self.out_norm = nn.GroupNorm(8, ch)
        self.out = nn.Conv2d(ch, lc, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.register_buffer("latent_mean", torch.zeros(lc))
        self.register_buffer("latent_std", torch.ones(lc))

    # -- latent space --------------------------------------------------------------------------
    def to_raw(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.latent_std.view(1, -1, 1, 1) + self.latent_mean.view(1, -1, 1, 1)

    def from_raw(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.latent_mean.view(1, -1, 1, 1)) / self.latent_std.view(1, -1, 1, 1)

    # -- network -------------------------------------------------------------------------------
    def encode_prompts(self, prompts) -> tuple:
        """(token sequence, pooled, padding mask) of prompts; "" is the unconditional prompt."""
        return self.text(tokenize(prompts).to(self.pos.device))

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: tuple) -> torch.Tensor:
        seq, pooled, pad = cond
        # ``sample`` steps through CPU times: the time features must be made where the model is
        c = self.time(_time_features(t.to(x.device).expand(x.shape[0]))) + self.text_proj(pooled)
        h = self.inp(x) + self.pos
        half = len(self.blocks) // 2
        for i, blk in enumerate(self.blocks):
            h = blk(h, c)
            if i == half - 1:
                h = self.xattn[0](h, seq, pad)
            elif i == len(self.blocks) - 1:
                h = self.xattn[1](h, seq, pad)
        return self.out(F.silu(self.out_norm(h)))

    def guided_velocity(self, x, t, cond, uncond, cfg: float):
        if cfg == 1.0:
            return self.velocity(x, t, cond)
        both = self.velocity(torch.cat([x, x]), t, tuple(torch.cat([a, b]) for a, b in zip(cond, uncond)))
        v_c, v_u = both.chunk(2)
        return v_u + cfg * (v_c - v_u)

    # -- sampling ------------------------------------------------------------------------------
    def sample(self, noise: torch.Tensor, prompts, steps: int = STEPS, cfg: float = CFG, x0_hook=None,
               cond=None) -> torch.Tensor:
        """Raw latents [B, C, 8, 8] from noise [B, C, 8, 8] by ``steps`` Euler steps; differentiable.

        prompts: one prompt or one per item. x0_hook(x0_raw, t, step) -> x0_raw may edit the
        predicted clean latent at every step (the safety guidance step plugs in here); the
        velocity is then recomputed from it, so the last step lands on the edited prediction. cond: precomputed ``prepare(prompts)``.
        """
        if not isinstance(noise, torch.Tensor) or noise.ndim != 4 or tuple(noise.shape[1:]) != (self.latent_channels, 8, 8):
            shape = list(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise InputError(f"noise must be a tensor [batch, {self.latent_channels}, 8, 8], got {shape}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InputError(f"steps must be an integer >= 1, got {steps!r}")
        cond, uncond = cond if cond is not None else self.prepare(prompts, noise.shape[0])
        x = noise.to(self.pos.dtype)
        ts = torch.linspace(1.0, 0.0, steps + 1)
        for i in range(steps):
            t, t_next = ts[i], ts[i + 1]
            v = self.guided_velocity(x, t.view(1), cond, uncond, cfg)
            if x0_hook is not None:
                x0 = self.to_raw(x - t * v)
                x0 = self.from_raw(x0_hook(x0, float(t), i))
                v = (x - x0) / t
            x = x + (t_next - t) * v
        return self.to_raw(x)

    def prepare(self, prompts, batch: int) -> tuple:
        """Conditional and unconditional text encodings, one row per item."""
        prompts = [prompts] * batch if isinstance(prompts, str) else list(prompts)
        if len(prompts) == 1 and batch > 1:
            prompts = prompts * batch
        if len(prompts) != batch:
            raise InputError(f"got {len(prompts)} prompts for a batch of {batch} noises; expected 1 or {batch}")
        return self.encode_prompts(prompts), self.encode_prompts([""] * batch)

    def as_function(self, prompts, steps: int = STEPS, cfg: float = CFG):
        """``noise -> raw latents`` for ``reno_optimize`` (text encoded once)."""
        cache = {}

        def generate(noise):
            if "c" not in cache or cache["c"][0][0].shape[0] != noise.shape[0]:
                cache["c"] = self.prepare(prompts, noise.shape[0])
            return self.sample(noise, prompts, steps, cfg, cond=cache["c"])
        return generate


def noise_for(seeds, device="cpu", channels: int = 4) -> torch.Tensor:
    """One standard Gaussian noise [channels, 8, 8] per integer seed, stacked (reproducible anywhere)."""
    return torch.stack([torch.randn(channels, 8, 8, generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds]).to(device)


# -- training ------------------------------------------------------------------------------------
def _captions(scenes, rng, full_prob: float) -> list[str]:
    out = []
    for sc in scenes:
        tc = S.true_captions(sc)
        out.append(tc[0] if len(tc) == 1 or rng.random() < full_prob else tc[int(rng.integers(1, len(tc)))])
    return out


def train_generator(vae, seed: int = 0, recipe: dict | None = None, log=print, progress_every: int = 100):
    """Train a MiniGenerator on latents of the VAE; returns (EMA model, info). Deterministic per seed."""
    r = {**RECIPE, **(recipe or {})}
    torch.manual_seed(seed + 11)
    rng = np.random.default_rng(seed * 7 + 3)
    t0 = time.time()
    batch = S.make_batch(seed * 104729 + 17, r["pool"])
    with torch.no_grad():
        from .vae import images_to_tensor
        lat = torch.cat([vae.encode(images_to_tensor(batch.images[i:i + 500])) for i in range(0, r["pool"], 500)])
    config = CONFIG if vae.latent_channels == 4 else {**CONFIG, "latent_channels": vae.latent_channels}
    model = MiniGenerator(config)
    if r.get("init_from"):   # warm start: every tensor of that generator whose shape fits (not the latent statistics)
        init, own = load_generator(r["init_from"]).state_dict(), model.state_dict()
        model.load_state_dict({k: v for k, v in init.items() if k in own and own[k].shape == v.shape
                               and not k.startswith("latent_")}, strict=False)
    model.latent_mean.copy_(lat.mean(dim=(0, 2, 3)))
    model.latent_std.copy_(lat.std(dim=(0, 2, 3)))
    data = model.from_raw(lat)
    scenes = batch.scenes
    log(f"generator: pool of {r['pool']} latents encoded in {time.time() - t0:.0f} s; "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params")
    ema = MiniGenerator(config)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed + 5)
    t1, avg = time.time(), None
    for step in range(r["steps"]):
        lr = r["lr"] * min(1.0, (step + 1) / r["warmup"]) * 0.5 * (1 + math.cos(math.pi * step / r["steps"]))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = rng.integers(0, r["pool"], r["batch"])
        caps = _captions([scenes[i] for i in idx], rng, r["full_caption_prob"])
        caps = ["" if rng.random() < r["drop_cond"] else c for c in caps]
        x0 = data[torch.from_numpy(idx)]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.sigmoid(torch.randn(r["batch"], generator=gen))  # logit-normal: middle times matter most
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        v = model.velocity(xt, t, model.encode_prompts(caps))
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - r["ema"])
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if step % progress_every == 0 or step == r["steps"] - 1:
            el = time.time() - t1
            log(f"generator step {step + 1}/{r['steps']} loss {avg:.4f} ({el / (step + 1):.2f} s/step, {el / 60:.1f} min)")
    ema.eval()
    return ema, {"seconds": round(time.time() - t0, 1), "steps": r["steps"], "final_loss": round(avg, 4),
                 "params": sum(p.numel() for p in ema.parameters()), "recipe": r}


# -- files ---------------------------------------------------------------------------------------
def save_generator(model: MiniGenerator, path, extra: dict | None = None) -> Path:
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    meta = {"format": FORMAT, "config": json.dumps(model.config), "steps": str(STEPS), "cfg": str(CFG),
            **{k: str(v) for k, v in (extra or {}).items()}}
    write_safetensors({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, path, meta)
    return path


def load_generator(path, device="cpu") -> MiniGenerator:
    """Read a generator written by ``save_generator`` (eval mode, no parameter gradients)."""
    sd, meta = read_tagged(path, FORMAT, "mini generator")
    model = build_from_metadata(path, meta, "config", sd, "mini generator", MiniGenerator)
    return model.to(device).eval().requires_grad_(False)


DESCRIPTION = ("mini generator: text -> 8x8x4 mini-VAE latents, a rectified flow sampled in 4 Euler steps "
               "(no guidance, cfg 1); read with latentclip.miniworld.generator.load_generator")


def add_to_manifest(directory, info: dict | None = None) -> Path:
    """Add (or refresh) the generator's entry in ``directory/manifest.json`` (part 1's format)."""
    from .manifest import file_entry
    directory = Path(directory)
    path, gen = directory / "manifest.json", directory / FILE
    manifest = json.loads(path.read_text()) if path.is_file() else {"files": []}
    entry = file_entry(gen, DESCRIPTION)
    manifest["files"] = [f for f in manifest["files"] if f["file"] != FILE] + [entry]
    if info is not None:
        manifest.setdefault("trained_with", {}).setdefault("timings", {})["generator"] = info
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path
