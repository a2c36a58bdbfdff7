"""Mini-world: renderer, grammar, judge, VAE shapes and training pieces (no shipped weights needed)."""
import contextlib
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from latentclip.errors import InputError
from latentclip.miniworld import judge as J
from latentclip.miniworld import scenes as S
from latentclip.miniworld.vae import MiniVAE, images_to_tensor


def test_renderer_is_deterministic_per_seed():
    a, b, c = S.make_batch(5, 16), S.make_batch(5, 16), S.make_batch(6, 16)
    assert a.images.dtype == np.uint8 and a.images.shape == (16, 64, 64, 3)
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    assert not np.array_equal(a.images, c.images)


def test_every_caption_round_trips_through_the_parser():
    caps = S.all_captions()
    assert len(caps) == len(set(caps)) > 500
    for c in caps:
        assert S.caption(S.parse(c)) == c
    assert S.parse("Two  Blue squares.") == S.Spec("count", "blue", "square", 2)
    assert S.parse("a red object") == S.Spec("single", color="red")


@pytest.mark.parametrize("bad", ["a purple circle", "four red squares", "a red circle near a blue square", ""])
def test_parser_rejects_prompts_outside_the_grammar(bad):
    with pytest.raises(InputError, match="grammar"):
        S.parse(bad)


def test_rendered_scenes_satisfy_their_captions_and_nothing_contradictory():
    batch = S.make_batch(1, 200)
    for sc, cap in zip(batch.scenes, batch.captions):
        assert S.holds(sc, S.parse(cap))
        for t in S.true_captions(sc):
            assert S.holds(sc, S.parse(t))
        if sc.relation is not None:  # exactly one of the four relations holds for an ordered pair
            a, rel, b = sc.relation
            oa, ob = sc.objects[a], sc.objects[b]
            specs = [S.Spec("relation", oa.color, oa.shape, 2, r, ob.color, ob.shape) for r in S.RELATIONS]
            assert [S.holds(sc, s) for s in specs].count(True) == 1


def test_render_prompts_draws_what_the_prompt_says():
    prompts = ["a green triangle to the left of a yellow circle", "three blue squares", "a red object"]
    batch = S.render_prompts(prompts, seed=3, per_prompt=4)
    assert batch.captions == [p for p in prompts for _ in range(4)]
    for sc, p in zip(batch.scenes, batch.captions):
        assert S.holds(sc, S.parse(p))


def _scene(*objs, relation=None):
    return S.Scene([S.Obj(*o) for o in objs], (235, 235, 240), "relation" if relation else "single", relation)


def test_judge_on_fixed_scenes():
    img = S.draw(_scene(("circle", "red", 16, 30, 9), ("square", "blue", 46, 34, 8), relation=(0, "to the left of", 1)))
    assert J.check(img, "a red circle to the left of a blue square")["ok"]
    r = J.check(img, "a red circle to the right of a blue square")
    assert r["object"] and r["count"] and not r["relation"] and not r["ok"]
    r = J.check(img, "a blue circle to the left of a red square")  # colours swapped: binding fails
    assert r["color"] and r["shape"] and not r["object"]
    tri = S.draw(_scene(("triangle", "yellow", 32, 32, 12)))
    assert J.check(tri, "a yellow triangle")["ok"] and J.check(tri, "a yellow object")["ok"]
    assert not J.check(tri, "a yellow square")["ok"] and not J.check(tri, "a green triangle")["ok"]
    three = S.draw(S.Scene([S.Obj("square", "green", x, 20, 7) for x in (12, 32, 52)], (240, 240, 240), "count"))
    assert J.check(three, "three green squares")["ok"]
    assert not J.check(three, "two green squares")["count"]
    assert J.check(np.full((64, 64, 3), 240, np.uint8), "a red circle")["ok"] is False


def test_judge_accepts_float_tensors_and_is_exact_on_renders():
    batch = S.make_batch(11, 60)
    x = images_to_tensor(batch.images)
    for img, sc, cap in zip(x, batch.scenes, batch.captions):
        assert J.check(img, cap)["ok"]
        assert all(all(v) for v in J.score_against_truth(J.detect(img), sc).values())


def test_vae_shapes_and_differentiable_decode():
    torch.manual_seed(0)
    vae = MiniVAE()
    x = images_to_tensor(S.make_batch(0, 2).images)
    x0 = x.clone()
    z = vae.encode(x)
    assert z.shape == (2, 4, 8, 8) and torch.equal(x, x0)
    z = z.detach().requires_grad_(True)
    vae.decode(z).mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    with pytest.raises(InputError, match="64, 64"):
        vae.encode(torch.zeros(1, 3, 32, 32))


def test_latent_config_file_matches_the_code():
    from latentclip.configs import CONFIG_DIR
    from latentclip.miniworld.clips import LATENT_CFG, PIXEL_CFG
    assert json.loads((CONFIG_DIR / "mini-latent.json").read_text()) == LATENT_CFG
    assert PIXEL_CFG["text_cfg"] == LATENT_CFG["text_cfg"]


def test_clip_training_step_lowers_the_loss_and_saved_latent_clip_loads(tmp_path):
    import latentclip
    from latentclip.miniworld import clips as C, train as T
    torch.manual_seed(0)
    recipe = json.loads(json.dumps(T.RECIPE))
    recipe["clip"].update(batch=16, warmup=1, lr=2e-3)
    imgs, caps, ts = T.make_pool(0, 64)
    lat = torch.randn(64, 4, 8, 8)
    model, info, snap = T.train_clip("latent", 0, recipe, lat, caps, ts, steps=3, snapshot_at=2, progress_every=10)
    assert info["steps"] == 3 and snap is not None and np.isfinite(info["final_loss"])
    path = C.save_clip(model, "latent", tmp_path / "m.safetensors")
    loaded = latentclip.load(path)
    assert loaded.vae_family == "mini" and loaded.latent_size == 8
    with torch.no_grad():
        a = loaded.encode_latents(lat[:2])
        b = model.encode_latents(lat[:2])
    assert torch.allclose(a, b, atol=2e-2)  # fp16 storage


def test_training_is_deterministic_for_a_seed():
    from latentclip.miniworld import train as T
    recipe = json.loads(json.dumps(T.RECIPE))
    recipe["vae"].update(steps=2, batch=4)
    a, _ = T.train_vae(3, recipe, progress_every=10)
    b, _ = T.train_vae(3, recipe, progress_every=10)
    c, _ = T.train_vae(4, recipe, progress_every=10)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    recipe["clip"].update(batch=8, warmup=1)
    imgs, caps, ts = T.make_pool(0, 32)
    runs = [T.train_clip("pixel", 1, recipe, imgs, caps, ts, steps=2, progress_every=10)[0] for _ in range(2)]
    s1, s2 = runs[0].clip.state_dict(), runs[1].clip.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def _tiny_recipe() -> dict:
    """train.RECIPE cut to a few steps and small pools: the whole `train` path in seconds."""
    from latentclip.miniworld import train as T
    recipe = json.loads(json.dumps(T.RECIPE))
    recipe["vae"].update(steps=2, batch=4)
    recipe["clip"].update(batch=8, warmup=1, pool=64, pixel_steps=2, latent_steps=3)
    recipe["generator"].update(steps=2, batch=8, warmup=1, pool=500)
    return recipe


def test_train_all_with_a_tiny_recipe_writes_a_manifest_and_refuses_to_overwrite(tmp_path):
    """The whole `train` command path (two spawned workers, manifest, atomic move) on a few steps."""
    from latentclip.miniworld import generator as G, train as T
    from latentclip.miniworld.manifest import content_sha256
    recipe = _tiny_recipe()
    out = T.train_all(tmp_path / "mini", seed=5, recipe=recipe, evaluate=False)
    manifest = json.loads((out / "manifest.json").read_text())
    rows = {f["file"]: f for f in manifest["files"]}
    assert set(rows) == {"mini-vae.safetensors", "mini-latent-clip.safetensors", "mini-pixel-clip.safetensors", G.FILE}
    assert all(content_sha256(out / name) == row["content_sha256"] for name, row in rows.items())
    timings = manifest["trained_with"]["timings"]
    assert timings["pixel"]["steps"] == 2 and timings["latent"]["steps"] == 3 and timings["generator"]["steps"] == 2
    assert len(timings["load_average_1_5_15_min"]["start"]) == 3
    assert not (out / "latent-equal-steps.pt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["mini"]  # no leftover work directory
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        T.train_all(out, seed=5, recipe=recipe, evaluate=False)
    assert (out / "manifest.json").read_bytes() == before


def test_train_all_stops_the_other_worker_when_one_fails(tmp_path):
    """Worker B waits for worker A's VAE; if A fails, train raises instead of waiting forever."""
    from latentclip.miniworld import train as T
    recipe = _tiny_recipe()
    recipe["vae"]["lr"] = "not a number"
    with pytest.raises(RuntimeError, match="latent worker failed"):
        T.train_all(tmp_path / "mini", seed=5, recipe=recipe, evaluate=False)
    assert list(tmp_path.iterdir()) == []   # neither --out nor a half-written work folder beside it


def test_vae_noise_follows_the_model_to_a_gpu_and_a_cpu_generator_keeps_its_draws():
    """``loss`` drew its noise on the CPU whatever the VAE's device; with a seeded CPU generator both
    ``loss`` and ``encode(sample=True)`` now draw there and move the noise, so a GPU gives the CPU's numbers."""
    import copy
    from fake_device import fake_device, to_device
    torch.manual_seed(0)
    vae = MiniVAE((8, 8, 8))
    x = images_to_tensor(S.make_batch(0, 2).images)
    want_loss = vae.loss(x, 1e-3, 4.0, generator=torch.Generator().manual_seed(3))[0]
    want_z = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
    gpu = to_device(copy.deepcopy(vae))
    with fake_device() as dev:
        xd = x.to(dev)
        loss = gpu.loss(xd, 1e-3, 4.0, generator=torch.Generator().manual_seed(3))[0]
        z = gpu.encode(xd, sample=True, generator=torch.Generator().manual_seed(3))
        assert z.device == dev
        assert torch.isfinite(gpu.loss(xd, 1e-3)[0].cpu())           # no generator: drawn on the device
        loss, z = loss.cpu(), z.cpu()
    assert torch.allclose(loss, want_loss, rtol=1e-5) and torch.allclose(z, want_z, atol=1e-6)


def test_images_to_tensor_refuses_float_images_and_leaves_them_alone():
    """Float images were divided by 255 again, in place: the caller's array changed and the result was ~0."""
    images = np.full((1, 64, 64, 3), 0.5, np.float32)
    with pytest.raises(InputError, match="uint8"):
        images_to_tensor(images)
    assert (images == 0.5).all()
    assert images_to_tensor(np.full((1, 64, 64, 3), 255, np.uint8)).eq(1).all()


def _die_silently(which, seed, recipe, out, queue):
    """A worker killed without a word (the OOM killer, a crash in native code)."""
    os._exit(9)


def _interrupt_parent(which, seed, recipe, out, queue):
    """A worker that is still busy when the user presses Ctrl-C in the training's terminal."""
    (Path(out).parent / f"{which}.pid").write_text(str(os.getpid()))
    os.kill(os.getppid(), signal.SIGINT)
    time.sleep(120)


@contextlib.contextmanager
def _deadline(seconds: int):
    """TimeoutError in the test instead of a run that never returns."""
    def expire(*_):
        raise TimeoutError(f"still waiting after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_worker_that_dies_without_reporting_is_an_error_not_a_hang(tmp_path):
    """The parent waited on the queue for a report that a killed worker never sends: train hung forever."""
    from latentclip.miniworld import train as T
    work = tmp_path / ".work"
    work.mkdir()
    with _deadline(120), pytest.raises(RuntimeError, match="exited with code 9 without reporting"):
        T.run_workers(_die_silently, ("a",), 0, _tiny_recipe(), work, "a test")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_stops_the_workers_and_removes_the_work_folder(tmp_path):
    """Ctrl-C left the workers running (writing into the folder) and the half-written folder in place."""
    from latentclip.miniworld import train as T
    work = tmp_path / ".work"
    work.mkdir()
    try:
        with _deadline(120), pytest.raises(KeyboardInterrupt):
            T.run_workers(_interrupt_parent, ("a",), 0, _tiny_recipe(), work, "a test")
        pid = int((tmp_path / "a.pid").read_text())
        assert not work.exists()
        with pytest.raises(ProcessLookupError):   # stopped and reaped
            os.kill(pid, 0)
    finally:
        if (tmp_path / "a.pid").exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int((tmp_path / "a.pid").read_text()), signal.SIGKILL)


@pytest.mark.parametrize("stage", ["workers", "evaluation"])
def test_train_all_leaves_no_work_folder_when_interrupted_or_failing_late(tmp_path, monkeypatch, stage):
    """Ctrl-C while training, or a failing evaluation after it, left a hidden .mini.training-* folder."""
    from latentclip.miniworld import eval as E, train as T

    def workers(worker, names, seed, recipe, tmp, what):
        (tmp / "mini-vae.safetensors").write_bytes(b"half")
        if stage == "workers":
            raise KeyboardInterrupt
        return {}

    def evaluate(*args, **kwargs):
        raise RuntimeError("evaluation failed")
    monkeypatch.setattr(T, "run_workers", workers)
    monkeypatch.setattr(E, "evaluate_dir", evaluate)
    with pytest.raises(KeyboardInterrupt if stage == "workers" else RuntimeError):
        T.train_all(tmp_path / "mini", seed=0, recipe=_tiny_recipe(), evaluate=True)
    assert list(tmp_path.iterdir()) == []


def test_a_work_folder_left_by_a_killed_run_with_the_same_pid_does_not_block_training(tmp_path):
    """The work folder was named by the pid alone; in a container the pid repeats, so one run killed
    outright (SIGKILL, power loss) made every later `train --out` into that folder fail with EEXIST."""
    from latentclip.miniworld import train as T
    stale = tmp_path / f".mini.training-{os.getpid()}"
    stale.mkdir()
    out, tmp = T.fresh_training_dir(tmp_path / "mini")
    assert out == tmp_path / "mini" and tmp.parent == tmp_path and tmp != stale and tmp.is_dir()
    assert not any(tmp.iterdir())


def test_the_training_folder_gets_the_usual_permissions(tmp_path):
    """The folder moves to --out when done: mkdtemp's owner-only mode would make the weights unreadable to a
    ComfyUI server running as another user."""
    import os
    from latentclip.miniworld.train import fresh_training_dir
    umask = os.umask(0o022)
    try:
        _, tmp = fresh_training_dir(tmp_path / "out")
    finally:
        os.umask(umask)
    assert tmp.stat().st_mode & 0o777 == 0o755
