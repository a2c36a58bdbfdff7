"""Training the mini-world models: the mini VAE, then a pixel CLIP and a Latent-CLIP on one stream.

``train_all`` runs two worker processes of one torch thread each (the machine has two cores):
worker A trains the VAE and then the Latent-CLIP on its latents; worker B trains the pixel CLIP
meanwhile. Step counts are fixed per recipe (so a seed gives the same weights), chosen so that both
CLIPs get the same wall time on this machine; each run also records the wall time it really took
and a copy of the Latent-CLIP at the pixel CLIP's step count (the equal-steps comparison).
Everything is written to a fresh directory that is moved into place at the end; existing files are
never overwritten.
"""
from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import queue as _queue
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import clips as _clips
from . import scenes as S
from .vae import MiniVAE, images_to_tensor, load_vae, save_vae
from . import generator as _gen

#: The recipe of the shipped weights. ``latent_steps`` is ``pixel_steps`` times the measured
#: per-step cost ratio (pixel / latent) so that both CLIPs train for the same wall time.
RECIPE = {
    "vae": {"steps": 1000, "batch": 64, "lr": 1e-3, "kl_weight": 1e-3, "edge_weight": 4.0, "channels": [32, 64, 96]},
    "clip": {"batch": 128, "lr": 1e-3, "warmup": 60, "weight_decay": 0.1, "pool": 50000,
             "pixel_steps": 900, "latent_steps": 2250, "relation_negatives": True},
    "generator": _gen.RECIPE,
    "threads_per_worker": 1,
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def _cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# -- VAE -----------------------------------------------------------------------------------------
def train_vae(seed: int, recipe: dict, progress_every: int = 50) -> tuple[MiniVAE, dict]:
    _seed_all(seed)
    r = recipe["vae"]
    vae = MiniVAE(tuple(r["channels"]), r.get("latent_channels", 4))
    if r.get("init_from"):   # warm start: every tensor of that VAE whose shape fits (not the latent statistics)
        init = load_vae(r["init_from"]).state_dict()
        own = vae.state_dict()
        vae.load_state_dict({k: init[k] for k in own if k in init and init[k].shape == own[k].shape
                             and not k.startswith(("latent_", "scale"))}, strict=False)
    opt = torch.optim.Adam(vae.parameters(), lr=r["lr"])
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(r["steps"]):
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, r["steps"], r["lr"], 20)
        x = images_to_tensor(S.make_batch(seed * 1_000_003 + step, r["batch"]).images)
        loss, mse, kl = vae.loss(x, r["kl_weight"], r.get("edge_weight", 0.0), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0 * r["batch"])
        opt.step()
        if step % progress_every == 0 or step == r["steps"] - 1:
            psnr = 10 * math.log10(1.0 / (mse.item() / (3 * 64 * 64)))
            log(f"vae step {step + 1}/{r['steps']} loss {loss.item():.1f} psnr {psnr:.2f} dB kl {kl.item():.1f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        lat = vae.encode(images_to_tensor(S.make_batch(seed + 77, 1024).images))
    vae.set_latent_stats(lat)
    return vae, {"seconds": round(time.time() - t0, 1), "steps": r["steps"]}


def encode_pool(vae: MiniVAE, images: np.ndarray, chunk: int = 512) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([vae.encode(images_to_tensor(images[i:i + chunk])) for i in range(0, len(images), chunk)])


# -- CLIPs ---------------------------------------------------------------------------------------
def make_pool(seed: int, n: int):
    """The shared training stream's scenes: images, one caption each, and each scene's true captions."""
    batch = S.make_batch(seed * 7919 + 1, n)
    return batch.images, batch.captions, [set(S.true_captions(s)) for s in batch.scenes]


def batch_order(seed: int, pool: int, steps: int, batch: int) -> np.ndarray:
    """Pool indices for every step: the same stream for both CLIPs (epochs of shuffles)."""
    rng = np.random.default_rng(seed * 31 + 5)
    need = steps * batch
    perms = [rng.permutation(pool) for _ in range(need // pool + 1)]
    return np.concatenate(perms)[:need].reshape(steps, batch)


def train_clip(kind: str, seed: int, recipe: dict, inputs, captions, truesets, steps: int,
               snapshot_at: int | None = None, progress_every: int = 100):
    """Contrastive training of one CLIP; returns the model, info and an optional snapshot state."""
    _seed_all(seed + (1 if kind == "latent" else 2))
    r = recipe["clip"]
    model = _clips.build(kind)
    clip = _clips.open_clip_model(model)
    decay = [p for n, p in clip.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in clip.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": r["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}], lr=r["lr"], betas=(0.9, 0.98), eps=1e-6)
    order = batch_order(seed, len(captions), steps, r["batch"])
    tokenizer = _clips.tokenizer()
    vocab = sorted(set(captions) | {c for t in truesets for c in t})
    tokens = dict(zip(vocab, tokenizer(vocab)))
    neg_rng = np.random.default_rng(seed * 13 + 3)
    snapshot, t0, ema = None, time.time(), None
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, steps, r["lr"], r["warmup"])
        idx = order[step]
        x = _clips.prepare_inputs(kind, inputs, idx)
        caps = [captions[i] for i in idx]
        extra = [relation_negative(c, neg_rng) for c in caps if " of " in c or " above " in c or " below " in c] \
            if r.get("relation_negatives") else []
        texts = caps + extra
        truth = torch.tensor([[c in truesets[i] for c in texts] for i in idx], dtype=torch.float32)
        img = torch.nn.functional.normalize(_clips.encode_image(model, kind, x), dim=-1)
        txt = torch.nn.functional.normalize(clip.encode_text(torch.stack([_tok(tokens, tokenizer, c) for c in texts])), dim=-1)
        logits = clip.logit_scale.exp().clamp(max=100) * img @ txt.T
        b = len(caps)  # texts past the batch (relation negatives) only act as extra negatives
        loss = 0.5 * (_soft_ce(logits, truth) + _soft_ce(logits[:, :b].T, truth[:, :b].T))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if snapshot_at is not None and step + 1 == snapshot_at:
            snapshot = {k: v.detach().clone() for k, v in clip.state_dict().items()}
        if step % progress_every == 0 or step == steps - 1:
            el = time.time() - t0
            log(f"{kind} clip step {step + 1}/{steps} loss {ema:.3f} ({el / (step + 1):.3f} s/step, {el / 60:.1f} min)")
    model.eval().requires_grad_(False)
    return model, {"seconds": round(time.time() - t0, 1), "steps": steps, "final_loss": round(ema, 4)}, snapshot


def relation_negative(caption: str, rng: np.random.Generator) -> str:
    """The same two objects in another relation: false for the scene the caption describes."""
    spec = S.parse(caption)
    others = [r for r in S.RELATIONS if r != spec.relation]
    return S.caption(S.Spec("relation", spec.color, spec.shape, 2, others[int(rng.integers(3))], spec.color2, spec.shape2))


def _tok(cache: dict, tokenizer, text: str) -> torch.Tensor:
    if text not in cache:
        cache[text] = tokenizer([text])[0]
    return cache[text]


def _soft_ce(logits: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a uniform target over every true pair (no false negatives)."""
    target = truth / truth.sum(1, keepdim=True)
    return -(target * logits.log_softmax(1)).sum(1).mean()


# -- orchestration -------------------------------------------------------------------------------
def _worker(which: str, seed: int, recipe: dict, out: str, queue) -> None:
    torch.set_num_threads(recipe["threads_per_worker"])
    try:
        out = Path(out)
        images, captions, truesets = make_pool(seed, recipe["clip"]["pool"])
        info = {}
        if which == "latent":
            vae, info["vae"] = train_vae(seed, recipe)
            save_vae(vae, out / "mini-vae.safetensors", {"seed": str(seed)})
            t = time.time()
            latents = encode_pool(vae, images)
            info["encode_pool_seconds"] = round(time.time() - t, 1)
            del images
            c = recipe["clip"]
            model, info["latent"], snap = train_clip("latent", seed, recipe, latents, captions, truesets,
                                                     c["latent_steps"], snapshot_at=c["pixel_steps"])
            _clips.save_clip(model, "latent", out / "mini-latent-clip.safetensors")
            if snap is not None:
                torch.save(snap, out / "latent-equal-steps.pt")
        else:
            model, info["pixel"], _ = train_clip("pixel", seed, recipe, images, captions, truesets,
                                                 recipe["clip"]["pixel_steps"])
            _clips.save_clip(model, "pixel", out / "mini-pixel-clip.safetensors")
            # then the generator, on the VAE worker A wrote long before (part 2)
            vae_path = out / "mini-vae.safetensors"
            while not vae_path.is_file():  # written atomically; if worker A fails, the parent stops this one
                time.sleep(1)
            gen, info["generator"] = _gen.train_generator(load_vae(vae_path), seed, recipe.get("generator"), log=log)
            _gen.save_generator(gen, out / _gen.FILE, {"seed": seed})
        queue.put((which, info, None))
    except BaseException as e:  # report, do not hang the parent
        import traceback
        queue.put((which, None, traceback.format_exc()))
        raise SystemExit(1) from e


def fresh_training_dir(out) -> tuple[Path, Path]:
    """``out`` (refused unless new or empty) and a temporary sibling to train into, moved there when done.

    The sibling's name is unique (not the pid alone): in a container the pid repeats from run to run,
    and the folder of a run killed outright would otherwise block every later one."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; refusing to overwrite it (choose a new --out)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.training-{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)   # mkdtemp's 0700 would follow the folder to --out: others could not read the weights
    return out, tmp


def _next_report(queue, procs: dict, reported: set) -> tuple:
    """The next worker's (name, info, error); a worker that died without a word (killed by the OOM
    killer, a signal, a crash in native code) is an error too, instead of a wait that never ends."""
    while True:
        try:
            return queue.get(timeout=1.0)
        except _queue.Empty:
            pass
        for name, p in procs.items():
            if name not in reported and p.exitcode is not None:
                try:   # its report, if it sent one, was in the pipe before it exited
                    return queue.get(timeout=1.0)
                except _queue.Empty:
                    return name, None, f"its process exited with code {p.exitcode} without reporting " \
                                       "(killed by a signal or out of memory?)"


def run_workers(worker, names, seed: int, recipe: dict, tmp: Path, what: str) -> dict:
    """Run ``worker(name, seed, recipe, tmp, queue)`` for each name in its own spawned process; their infos merged,
    with the training time and the machine's load (timings are slower when other work shared the cores).

    If a worker fails or dies, or the caller is interrupted (Ctrl-C), the other workers are stopped and
    ``tmp`` is removed: no half-written folder is left beside ``--out``."""
    t0, load_start = time.time(), os.getloadavg()
    log(f"training {what} into {tmp} (seed {seed}, {len(names)} workers x {recipe['threads_per_worker']} thread)")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = {w: ctx.Process(target=worker, args=(w, seed, recipe, str(tmp), queue)) for w in names}
    info, errors, reported = {}, [], set()
    try:
        for p in procs.values():
            p.start()
        while len(reported) < len(procs):
            which, part, err = _next_report(queue, procs, reported)
            reported.add(which)
            if err:
                errors.append(f"{which} worker failed:\n{err}")
                break  # the other worker may be waiting for this one's output: stop it below
            info.update(part)
    except BaseException:
        _stop(procs.values())
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if errors:
        _stop(procs.values())
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError("\n".join(errors) + f"\nthe unfinished training folder {tmp} was removed")
    for p in procs.values():
        p.join()
    info["train_seconds"] = round(time.time() - t0, 1)
    # the two workers alone make ~2; more means other work shared the cores and timings are slower
    info["load_average_1_5_15_min"] = {"start": [round(x, 2) for x in load_start],
                                       "end": [round(x, 2) for x in os.getloadavg()]}
    log(f"training done in {info['train_seconds'] / 60:.1f} min")
    return info


def _stop(procs) -> None:
    """Terminate the workers still running and wait for every one (none outlives the caller)."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        if p.pid is not None:   # started
            p.join()


@contextlib.contextmanager
def removed_on_failure(tmp: Path):
    """Remove the work folder when what runs inside fails or is interrupted (Ctrl-C): no half-written
    folder is left beside ``--out``. ``publish`` runs after it, so a finished folder is never removed."""
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: Path, out: Path, t0: float) -> Path:
    """Move the finished training folder to ``out`` (new or empty, checked before training)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        try:
            out.rmdir()  # empty when training started
        except OSError:
            raise FileExistsError(f"{out} was filled while training ran; refusing to overwrite it. The finished "
                                  f"training is in {tmp}: move it where you want it") from None
    shutil.move(str(tmp), str(out))
    log(f"wrote {out} ({sum(f.stat().st_size for f in out.iterdir()) / 2**20:.1f} MB) in {(time.time() - t0) / 60:.1f} min")
    return out


def train_all(out="weights/mini", seed: int = 0, recipe: dict | None = None, evaluate: bool = True) -> Path:
    """Train every mini-world model into a fresh directory, evaluate, then move it to ``out``."""
    recipe = recipe or RECIPE
    t0 = time.time()
    out, tmp = fresh_training_dir(out)
    with removed_on_failure(tmp):
        info = run_workers(_worker, ("latent", "pixel"), seed, recipe, tmp, "the mini-world")
        scores = None
        if evaluate:
            from .eval import evaluate_dir
            torch.set_num_threads(2)
            scores = evaluate_dir(tmp, equal_steps=tmp / "latent-equal-steps.pt")
        eq = tmp / "latent-equal-steps.pt"
        if eq.exists():
            eq.unlink()
        from .manifest import write_manifest
        write_manifest(tmp, seed=seed, recipe=recipe, info=info, scores=scores)
        if (tmp / _gen.FILE).is_file():
            _gen.add_to_manifest(tmp)
    return publish(tmp, out, t0)
