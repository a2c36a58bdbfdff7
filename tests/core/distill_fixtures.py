"""Tiny teachers and shard folders for the trainer tests: real open_clip models and real tar shards."""
import json
from pathlib import Path

import numpy as np
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from latentclip.train.distill import Teacher
from latentclip.train.shards import FORMAT, MANIFEST, Sample, write_shard

TEACHER_CFG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                                                "head_width": 16},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1}}
#: A student image tower on 16 x 8 x 8 latents (64-pixel images, factor 8): 2 layers of width 64 (one
#: 64-wide head: the loader infers head counts of 64-wide heads from a file's tensors).
STUDENT_CFG = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 2},
               "text_cfg": TEACHER_CFG["text_cfg"]}
CAPTIONS = ["a red circle", "a blue square", "two green triangles", "a circle left of a square"]


def tiny_teacher(seed: int = 0) -> Teacher:
    torch.manual_seed(seed)
    model = CLIP(TEACHER_CFG["embed_dim"], CLIPVisionCfg(**TEACHER_CFG["vision_cfg"]), CLIPTextCfg(**TEACHER_CFG["text_cfg"]))
    return Teacher(model.eval(), "tiny-teacher", json.loads(json.dumps(TEACHER_CFG)))


def write_dataset(folder: Path, n: int = 24, per_shard: int = 10, family: str = "flux", seed: int = 0) -> Path:
    """``n`` samples of random latents and unit teacher embeddings, captioned, with a manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        emb = rng.standard_normal(32).astype(np.float32)
        meta = {"negatives": ["a circle right of a square"]} if i % 4 == 3 else {}
        samples.append(Sample(f"s{i:04d}", rng.standard_normal((16, 8, 8)).astype(np.float32), emb / np.linalg.norm(emb),
                              CAPTIONS[i % len(CAPTIONS)], meta))
    for start in range(0, n, per_shard):
        write_shard(folder / f"{start // per_shard:06d}.tar", samples[start:start + per_shard])
    manifest = {"format": FORMAT, "version": 1, "family": family, "vae": "test-vae.safetensors", "image_size": 64,
                "latent_shape": [16, 8, 8], "teacher": {"model": "tiny-teacher", "file": "t.safetensors", "embed_dim": 32}}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def student_config_file(folder: Path) -> Path:
    path = folder / "student.json"
    path.write_text(json.dumps({**STUDENT_CFG, "vae_family": "flux"}))
    return path


def run_rank_reporting(rank: int, world: int, port: int, settings, errors) -> None:
    """One spawned gloo rank of ``distill.run``: puts "rank R: trained" or "rank R: InputError: ..." on
    ``errors``, for tests where every rank must stop together with one sentence."""
    import os
    from latentclip.errors import InputError
    from latentclip.train.distill import run
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        run(settings, teacher=tiny_teacher(), log=lambda m: None)
        errors.put(f"rank {rank}: trained")
    except InputError as e:
        errors.put(f"rank {rank}: InputError: {e}")


def messages_of_two_ranks(target, args_of, timeout: float = 240) -> list[str]:
    """Start two spawned ranks of ``target(rank, 2, port, *args_of(rank), errors)`` (fork breaks where CUDA or
    autograd threads already run) and return what each put on ``errors``, sorted."""
    import multiprocessing
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    errors = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, 2, port, *args_of(r), errors)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    return sorted(errors.get(timeout=5) for _ in procs)
