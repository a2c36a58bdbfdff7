"""The distillation loop: a Latent-CLIP image tower learns a pixel CLIP teacher's image embeddings.

The student is the pack's ``LatentCLIP``: its image tower (patch embedding for the family's
channels, vision width/layers from a Latent-CLIP config) is trained; its text tower is a frozen copy
of the teacher's, so the teacher's text embeddings, zero-shot prompts and every head trained on the
teacher's space apply to the student unchanged. Loss: ``distill_loss``'s cosine regression on
pre-encoded shards, plus (``contrastive_weight`` > 0) the caption-contrastive term over the global
batch with the captions' hard negatives.

Data order is a function of (seed, step) alone: each epoch is a seeded permutation of all samples
(its last global batch topped up from the permutation's start), step s takes global rows
[s*G, (s+1)*G) of it and rank r rows [r*B, (r+1)*B) of those. So N processes x batch B train on
exactly what 1 process x batch N*B does, every sample is seen once per epoch across ranks, and a
resumed run continues where the interrupted one stopped.
"""
from __future__ import annotations

import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import configs as _configs
from ..checkpoints import save
from ..distill_loss import caption_contrastive, cosine_regression
from ..errors import CheckpointError, InputError
from ..model import LatentCLIP
from . import distributed
from ..families import get_family
from .shards import ShardIndex

RESUME_FILE = "resume.pt"
LOG_FILE = "log.jsonl"


@dataclass
class Settings:
    data: str
    teacher: str
    out: str
    work: str
    config: str = "Latent-ViT-B-8-512"
    teacher_model: str | None = None
    batch: int = 64                 # per process
    steps: int = 1000
    lr: float = 5e-4
    warmup: int = 100
    weight_decay: float = 0.2
    grad_clip: float = 1.0
    contrastive_weight: float = 0.0
    init_vision: str = "teacher"    # or "random"
    grad_checkpointing: bool = True
    seed: int = 0
    save_every: int = 500
    log_every: int = 10
    stop_after: int | None = None   # end this process after so many steps (a time-limited job); resume later
    device: str | None = None
    precision: str = "auto"         # auto: bf16 where the GPU has it, else fp16 + loss scaling; fp32 on the CPU
    force: bool = False

    def fingerprint(self, world_size: int, samples: int | None = None, shards: int | None = None) -> dict:
        """What must not change between a run and its resumption (shards added to --data change the order)."""
        keep = ("config", "steps", "lr", "warmup", "weight_decay", "grad_clip", "contrastive_weight", "init_vision", "seed")
        out = {**{k: getattr(self, k) for k in keep}, "global_batch": self.batch * world_size,
               "data": str(Path(self.data).resolve())}
        if samples is not None:
            out.update(data_samples=samples, data_shards=shards)
        return out


@dataclass
class Teacher:
    """The pixel CLIP: an ``open_clip.CLIP`` and its open_clip config (``embed_dim``, towers)."""
    model: torch.nn.Module
    name: str
    config: dict = field(default_factory=dict)


def teacher_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a teacher's weights (every tensor's name, shape and first 4096 values): two files
    of one architecture with other weights differ, the same weights in another file format do not."""
    import hashlib
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def load_teacher(path, model_name: str | None = None) -> Teacher:
    """The teacher from its local weights file (never downloaded); InputError naming the file if it does not load."""
    import open_clip
    from ..pixel_clip import load_pixel_clip
    try:
        model, _, name = load_pixel_clip(path, model_name or None)
    except CheckpointError as e:
        raise InputError(f"teacher file '{Path(path).name}' does not load: {e}") from None
    return Teacher(model, name, open_clip.get_model_config(name) or {})


def student_config(config, teacher: Teacher, family, vae_name: str = "") -> dict:
    """A Latent-CLIP config: ``config``'s image tower on ``family``'s latents, the teacher's text tower."""
    base = _configs.get_config(config)
    vision = {k: v for k, v in base["vision_cfg"].items() if k not in ("latent_n_channels", "latent_encoder_name")}
    vision.update(latent_factor=family.factor, latent_channels=family.channels)
    if vae_name:
        vision["latent_encoder_name"] = vae_name[:200]
    cfg = {"embed_dim": teacher.config.get("embed_dim"), "vae_family": family.name, "vision_cfg": vision,
           "text_cfg": dict(teacher.config.get("text_cfg", {}))}
    if teacher.config.get("quick_gelu"):
        cfg["quick_gelu"] = True
    try:
        return _configs.validate_config(cfg)
    except _configs.ConfigError as e:
        raise InputError(f"teacher {teacher.name}'s text tower cannot be the text tower of a Latent-CLIP ({e})") from None


def build_student(cfg: dict, teacher: Teacher, init_vision: str = "teacher") -> tuple[LatentCLIP, int]:
    """The student with the teacher's text tower (frozen) and, for ``init_vision`` "teacher", every
    image-tower tensor whose name and shape match the teacher's; returns it and that count."""
    student = LatentCLIP(cfg)
    t_sd = teacher.model.state_dict()
    s_sd = student.clip.state_dict()
    text = {k: v for k, v in t_sd.items() if not k.startswith("visual.")}
    odd = sorted(set(text) ^ {k for k in s_sd if not k.startswith("visual.")})
    if odd:
        raise InputError(f"teacher {teacher.name}'s text tower does not fit the student's (differs in {odd[:3]})")
    copied = {k: v for k, v in t_sd.items() if k.startswith("visual.") and k != "visual.conv1.weight"
              and k in s_sd and s_sd[k].shape == v.shape} if init_vision == "teacher" else {}
    student.clip.load_state_dict({**text, **copied}, strict=False)
    student.requires_grad_(False)
    student.clip.visual.requires_grad_(True)
    return student, len(copied)


def steps_per_epoch(n: int, global_batch: int) -> int:
    return math.ceil(n / global_batch)


def global_rows(step: int, n: int, global_batch: int, seed: int) -> np.ndarray:
    """The sample numbers of global batch ``step``: a seeded permutation per epoch, its last batch
    topped up from the permutation's start (so a batch is always full).

    The permutation repeats as often as the top-up needs: with fewer samples than half a global batch,
    one copy could not fill it, and a rank whose slice came out empty failed while the others waited."""
    per_epoch = steps_per_epoch(n, global_batch)
    epoch, pos = divmod(step, per_epoch)
    order = np.resize(np.random.default_rng([seed, epoch]).permutation(n), per_epoch * global_batch)
    return order[pos * global_batch:(pos + 1) * global_batch]


def lr_at(step: int, s: Settings) -> float:
    """Linear warm-up then cosine decay to zero (open_clip's default schedule)."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return 0.5 * s.lr * (1 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(visual: torch.nn.Module, s: Settings) -> torch.optim.Optimizer:
    decay, rest = [], []
    for name, p in visual.named_parameters():
        if p.requires_grad:
            (rest if p.ndim < 2 or "ln_" in name or "embedding" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=s.lr, betas=(0.9, 0.98), eps=1e-6)


def _text_rows(student: LatentCLIP, samples, world) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Teacher text embeddings of the global batch's captions and hard negatives (None without captions)."""
    local = [(s.caption, s.negatives) for s in samples]
    rows = [None] * world.size
    if world.size > 1:
        dist.all_gather_object(rows, local)
    else:
        rows = [local]
    everything = [r for part in rows for r in part]
    if any(caption is None for caption, _ in everything):
        return None, None
    with torch.no_grad():
        text = student.encode_text([c for c, _ in everything]).float()
        negatives = [n for _, negs in everything for n in negs]
        neg = student.encode_text(negatives).float() if negatives else None
    return text, neg


PRECISIONS = ("auto", "bf16", "fp16", "fp32")

#: an fp16 loss scale below this means every step overflows, however small the scaled gradients: the run has
#: diverged (fairseq's --min-loss-scale default). From GradScaler's 65536, about 30 skipped steps in a row.
MIN_LOSS_SCALE = 1e-4


def cuda_bf16_supported(device: torch.device) -> bool:
    """Native bf16 on this GPU (Ampere and newer, recent ROCm). Emulated bf16 does not count: on a
    V100 or T4 it runs, much slower than fp16."""
    if not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA GPU is available here; expected --device cpu or a machine with a GPU")
    with torch.cuda.device(device):
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:   # a torch without the argument checked natively only
            return torch.cuda.is_bf16_supported()


def resolve_precision(requested: str, device: torch.device, bf16_supported=None) -> str:
    """bf16, fp16 or fp32 for ``--precision`` on ``device``; auto keeps the old bf16 where the GPU has it."""
    bf16_supported = bf16_supported or cuda_bf16_supported   # looked up now: tests stand in for the GPU query
    if requested not in PRECISIONS:
        raise InputError(f"--precision {requested}: expected auto, bf16, fp16 or fp32")
    if device.type not in ("cuda", "cpu"):
        if requested in ("auto", "fp32"):
            return "fp32"
        raise InputError(f"--precision {requested}: mixed precision is for CUDA GPUs and the CPU, not device "
                         f"{device}; expected --precision auto or fp32 there")
    if device.type == "cpu":
        return "fp32" if requested == "auto" else requested
    if requested in ("auto", "bf16"):
        if bf16_supported(device):
            return "bf16"
        if requested == "bf16":
            try:
                name = f" ({torch.cuda.get_device_name(device)})"
            except Exception:  # noqa: BLE001 - the name only decorates the message
                name = ""
            raise InputError(f"--precision bf16: GPU {device}{name} has no native bf16 (it needs compute "
                             "capability 8.0 or newer: A100, RTX 30xx and later); expected --precision auto "
                             "(fp16 here), fp16 or fp32 on this GPU")
        return "fp16"
    return requested


def _autocast(precision: str, device: torch.device):
    """The forward pass's autocast; fp32 is a disabled one, so the loop has one shape for every precision."""
    if precision == "fp32":
        return torch.autocast(device.type if device.type in ("cuda", "cpu") else "cpu", enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _save_resume(path: Path, step: int, visual, opt, fingerprint: dict, precision: dict | None = None) -> None:
    from .shards import atomic_write
    state = {"step": step, "visual": visual.state_dict(), "optimizer": opt.state_dict(),
             "fingerprint": json.dumps(fingerprint, sort_keys=True), **(precision or {})}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


#: fingerprint keys a resume file written before they existed lacks (it resumes; its data is not re-checked)
NEWER_FINGERPRINT_KEYS = ("data_samples", "data_shards")


#: how a resume refusal names the fingerprint keys that are not a flag of their own
FINGERPRINT_NAMES = {"global_batch": "the global batch (--batch x processes)", "data_samples": "the samples in --data",
                     "data_shards": "the shards in --data"}


def _load_resume(path: Path, visual, opt, fingerprint: dict) -> tuple[int, dict]:
    """The step to continue from and the file's precision state (empty for files written before it)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways
        raise InputError(f"resume file '{path}' could not be read ({str(e).splitlines()[0][:120]}); delete it to start over") from None
    old = json.loads(state.get("fingerprint", "{}"))
    diff = [k for k in fingerprint if old.get(k) != fingerprint[k] and (k in old or k not in NEWER_FINGERPRINT_KEYS)]
    if diff:   # named as flags with both values: "global_batch" alone did not say that --batch x processes changed
        was = "; ".join(f"{FINGERPRINT_NAMES.get(k, '--' + k.replace('_', '-'))} was {old.get(k)}, now {fingerprint[k]}"
                        for k in diff)
        raise InputError(f"--work '{path.parent}' holds a run with other settings ({', '.join(diff)}): {was}; "
                         "use another --work folder or the same settings to resume")
    visual.load_state_dict(state["visual"])
    opt.load_state_dict(state["optimizer"])
    return int(state["step"]), {k: state[k] for k in PRECISION_STATE if k in state}


#: what the resume file keeps of the precision: the one used, where it changed, the fp16 loss scaler's state
PRECISION_STATE = ("precision", "precision_history", "scaler", "skipped_steps")


def _append_log(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _trim_log(path: Path, step: int) -> list[int | None]:
    """Rewrite ``path`` without the lines of steps after ``step`` (a crash after logging steps its last
    checkpoint did not reach: this run repeats them) and without a half-written last line; returns the
    dropped steps (None for a cut line). Other lines are kept byte for byte; the file is replaced whole, never truncated in place."""
    from .shards import atomic_write
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise InputError(f"--work log '{path}' could not be read ({e.strerror or e}); expected a readable "
                         f"{LOG_FILE} or none") from None
    *whole, tail = raw.split(b"\n")    # tail: b"" when the file ends with a newline, else a line cut by a crash
    keep, dropped = [], []
    for i, line in enumerate(whole + ([tail] if tail else [])):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        at = record.get("step") if isinstance(record, dict) else None
        if isinstance(at, int) and not isinstance(at, bool) and at > step:
            dropped.append(at)
        elif i == len(whole):   # the cut line: appended to, it would corrupt the next record
            if record is not None:
                keep.append(line + b"\n")
            else:
                dropped.append(None)
        else:
            keep.append(line + b"\n")
    if not dropped and not tail:
        return []
    try:
        atomic_write(path, lambda tmp: tmp.write_bytes(b"".join(keep)))
    except OSError as e:
        raise InputError(f"--work log '{path}' could not be rewritten without the steps after {step} "
                         f"({e.strerror or e}); it is unchanged; expected a writable --work with free space") from None
    return dropped


def _dropped_lines(dropped: list) -> str:
    steps = sorted(x for x in dropped if x is not None)
    what = "" if not steps else f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
    cut = "a half-written line" if None in dropped else ""
    return (f"dropped {len(dropped)} line{'s' if len(dropped) > 1 else ''} ("
            + ", ".join(x for x in (what, cut) if x) + ")")


def _gather_disagreement(value, world) -> tuple[list, int | None]:
    """Every rank's ``value`` and the first rank whose value is not rank 0's (None when all agree, or alone):
    the checks below stop all ranks together instead of letting them train apart."""
    if world.size == 1:
        return [value], None
    seen = [None] * world.size
    dist.all_gather_object(seen, value)
    return seen, next((r for r, other in enumerate(seen) if other != seen[0]), None)


def _check_same_data(index: ShardIndex, world) -> None:
    """Every rank indexed the same shards: the data order is computed per rank, so ranks that saw another
    sample count (an encode still writing, a node's incomplete copy) would silently train on overlapping
    and missing samples."""
    seen, odd = _gather_disagreement((len(index), [p.name for p in index.shards]), world)
    if odd is not None:
        raise InputError(f"the ranks see different shards in --data: rank 0 {seen[0][0]} samples in {len(seen[0][1])} "
                         f"shards, rank {odd} {seen[odd][0]} in {len(seen[odd][1])}; expected every rank to "
                         "read the same finished shards (wait for encode to finish, or complete each node's copy)")


def _check_same_start(step: int, world) -> None:
    """Every rank resumes at the same step: a rank that found no resume file (--work on a node's own disk)
    trained from step 0 beside rank 0's resumed weights, diverging in silence or hanging in DDP."""
    steps, odd = _gather_disagreement(step, world)
    if odd is not None:
        raise InputError(f"rank 0 resumes at step {steps[0]} and rank {odd} at step {steps[odd]}: they read other "
                         f"{RESUME_FILE} files; expected --work on a file system every node sees")


def _check_same_precision(precision: str, requested: str, world) -> None:
    """Every rank trains in one precision: with ``auto`` on mixed GPU types an fp16 rank would skip steps
    that the bf16 ranks take, and their weights would part in silence."""
    seen, odd = _gather_disagreement(precision, world)
    if odd is not None:
        raise InputError(f"--precision {requested}: rank 0 trains in {seen[0]} and rank {odd} in {seen[odd]} (its GPU "
                         "has no native bf16); expected one precision on every rank: --precision fp16 (or fp32) "
                         "on GPUs of mixed types")


def _check_ranges(s: Settings) -> None:
    """Values that trained silently wrong: a negative --grad-clip (meant as off) reversed every gradient."""
    bad = [(flag, v, want) for flag, v, ok, want in (
        ("--lr", s.lr, s.lr > 0, "above 0"), ("--warmup", s.warmup, s.warmup >= 0, "at least 0"),
        ("--weight-decay", s.weight_decay, s.weight_decay >= 0, "at least 0"),
        ("--grad-clip", s.grad_clip, s.grad_clip >= 0, "at least 0 (0: no clipping)"),
        ("--contrastive-weight", s.contrastive_weight, s.contrastive_weight >= 0, "at least 0 (0: cosine only)"),
        ("--stop-after", s.stop_after, s.stop_after is None or s.stop_after >= 1, "at least 1")) if not ok]
    if bad:
        flag, value, want = bad[0]
        raise InputError(f"{flag} {value:g} must be {want}; expected a finite number in that range")


def run(s: Settings, teacher: Teacher | None = None, log=None) -> Path | None:
    """Train (or resume) and, when ``s.steps`` are done, write the fp16 Latent-CLIP to ``s.out``.

    Returns the written file, or None when ``stop_after`` ended this process first.
    """
    world = distributed.world_from_env()
    distributed.check_launched(world)   # first: a batch script without srun waited for ranks nothing started
    device = distributed.pick_device(world, s.device)
    say = (log or (lambda m: print(m, file=sys.stderr, flush=True))) if world.is_main else (lambda m: None)
    if s.batch < 1 or s.steps < 1:
        raise InputError(f"--batch {s.batch} and --steps {s.steps} must be at least 1")
    if s.save_every < 1 or s.log_every < 1:   # they divide the step count: 0 failed after the first step
        raise InputError(f"--save-every {s.save_every} and --log-every {s.log_every} must be at least 1")
    _check_ranges(s)
    precision = resolve_precision(s.precision, device)   # first: a bf16 refusal costs no data indexing
    out, work = Path(s.out), Path(s.work)
    if out.is_dir():   # before the exists check, which told a folder to use --force
        raise InputError(f"--out '{out}' is a folder; expected the Latent-CLIP file to write, e.g. {out / 'name.safetensors'}")
    if out.exists() and not s.force:
        raise InputError(f"--out '{out}' exists; refusing to overwrite it (use --force)")
    if world.size == 1:   # e.g. a ComfyUI without models/latent_clip yet: made now, not after hours of training
        _make_folders(out, work)
    index = ShardIndex(s.data)
    manifest = index.manifest
    if not len(index):
        raise InputError(f"the shards in '{s.data}' hold no samples; expected the output of python -m latentclip encode")
    family = get_family(manifest["family"])
    teacher = teacher or load_teacher(s.teacher, s.teacher_model)
    if teacher.name != manifest["teacher"]["model"] or teacher.config.get("embed_dim") != index.embed_dim:
        raise InputError(f"the shards in '{s.data}' hold embeddings of teacher {manifest['teacher']['model']} "
                         f"({index.embed_dim}-d) but --teacher is {teacher.name} ({teacher.config.get('embed_dim')}-d); "
                         "the student's text tower must come from the teacher that made the embeddings")
    made_by = manifest["teacher"].get("fingerprint")
    if made_by and made_by != teacher_fingerprint(teacher.model):
        raise InputError(f"the shards in '{s.data}' were made by teacher file '{manifest['teacher'].get('file')}' and "
                         f"--teacher '{Path(s.teacher).name or teacher.name}' holds other weights of the same architecture; "
                         "the student's text tower must come from the teacher that made the embeddings")
    distributed.init(world, device)
    if world.size > 1:   # once the group is up: a rank 0 that failed before it left the others waiting to join
        distributed.on_main(world, lambda: _make_folders(out, work), "create the --out and --work folders")
    _check_same_data(index, world)
    _check_same_precision(precision, s.precision, world)
    torch.manual_seed(s.seed)
    cfg = student_config(s.config, teacher, family, manifest.get("vae", ""))
    if manifest.get("image_size") and manifest["image_size"] != cfg["vision_cfg"].get("image_size"):
        say(f"note: the shards hold latents of {manifest['image_size']}-pixel crops and --config {s.config} expects "
            f"{cfg['vision_cfg'].get('image_size')} pixels; the latents are resized to its grid (bilinear), as at inference")
    student, copied = build_student(cfg, teacher, s.init_vision)
    del teacher
    student.to(device)
    visual = student.clip.visual
    if s.grad_checkpointing:
        visual.set_grad_checkpointing(True)
    model = visual
    if world.size > 1:
        model = torch.nn.parallel.DistributedDataParallel(visual, device_ids=[device.index] if device.type == "cuda" else None)
    opt = _optimizer(visual, s)
    fingerprint = s.fingerprint(world.size, len(index), len(index.shards))
    resume = work / RESUME_FILE
    step, kept = _load_resume(resume, visual, opt, fingerprint) if resume.is_file() else (0, {})
    _check_same_start(step, world)
    # fp16 needs loss scaling: an overflowing step is skipped and the scale lowered (GradScaler's dynamic scaling)
    scaler = torch.amp.GradScaler(device.type, enabled=True) if precision == "fp16" else None
    if scaler is not None and "scaler" in kept:
        scaler.load_state_dict(kept["scaler"])
    history = [list(x) for x in kept.get("precision_history", [])] or ([[0, kept["precision"]]] if "precision" in kept else [])
    if history and history[-1][1] != precision:   # auto on another GPU type: it resumes, and says so
        say(f"note: this run trained in {history[-1][1]} until step {step} and continues in {precision}; "
            "a resumed run then differs from an uninterrupted one")
    if not history or history[-1][1] != precision:
        history.append([step, precision])
    skipped_steps = int(kept.get("skipped_steps", 0)) if precision == "fp16" else 0

    def precision_state() -> dict:
        out = {"precision": precision, "precision_history": history}
        if scaler is not None:
            out.update(scaler=scaler.state_dict(), skipped_steps=skipped_steps)
        return out

    G = s.batch * world.size
    say(f"distilling {teacher_name(manifest)} into a {family.name} Latent-CLIP: {len(index)} samples, "
        f"{sum(p.numel() for p in visual.parameters()) / 1e6:.2f}M trained parameters ({copied} tensors from the "
        f"teacher's image tower), {world.size} process(es) x batch {s.batch} on {device} in {precision}, "
        f"{steps_per_epoch(len(index), G)} steps per epoch" + (f", resuming at step {step}" if step else ""))
    dropped = distributed.on_main(world, lambda: _trim_log(work / LOG_FILE, step), f"rewrite {LOG_FILE} in --work")
    if dropped:
        say(f"note: {LOG_FILE}: {_dropped_lines(dropped)} after step {step}, where this run continues")
    autocast = _autocast(precision, device)
    logit_scale = student.clip.logit_scale.exp().item()
    skipped_in_a_row = 0
    started, ran, t0, c0 = step, 0, time.perf_counter(), time.process_time()

    def read_batch(at: int) -> list:
        rows = global_rows(at, len(index), G, s.seed)[world.rank * s.batch:(world.rank + 1) * s.batch]
        return [index[int(i)] for i in rows]

    reader = ThreadPoolExecutor(1)  # the next batch is read from the shards while this one trains
    upcoming = reader.submit(read_batch, step)
    while step < s.steps and (s.stop_after is None or ran < s.stop_after):
        samples = upcoming.result()
        if step + 1 < s.steps:
            upcoming = reader.submit(read_batch, step + 1)
        latents = torch.from_numpy(np.stack([x.latent for x in samples])).float()
        target = torch.from_numpy(np.stack([x.teacher for x in samples])).to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s)
        with autocast:
            feats = model(student.prepare_latents(latents.to(device=device)))
        loss = cosine_regression(feats, target)
        parts = {"cosine": float(loss.detach())}
        if s.contrastive_weight:
            text, negatives = _text_rows(student, samples, world)
            if text is not None:
                con = caption_contrastive(distributed.gather_rows(feats.float(), world), text, logit_scale, negatives)
                parts["contrastive"] = float(con.detach())
                loss = loss + s.contrastive_weight * world.size * con
        opt.zero_grad(set_to_none=True)
        (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is not None:
            scaler.unscale_(opt)   # the clip and the finiteness check see the true gradients
        # the norm is the same on every rank (DDP averaged the gradients), so all decide alike; a non-finite one
        # would make every weight NaN and the next save would replace the good resume.pt with them
        norm = torch.nn.utils.clip_grad_norm_(visual.parameters(), s.grad_clip or math.inf)
        finite = bool(torch.isfinite(norm))
        losses = ", ".join(f"{k} loss {v:.4g}" for k, v in parts.items())
        if not finite and (scaler is None or not _finite_everywhere(loss, world)):
            # in fp16 only a non-finite loss stops here: a gradient overflow alone is skipped by the scaler below
            what, hint = ("gradients are", "lower --lr, or check the shards") if scaler is None else \
                ("loss is", "fp16 may overflow in the forward pass: --precision fp32 (or bf16 on a GPU with it), "
                            "lower --lr, or check the shards")
            raise InputError(f"step {step + 1}: the {what} not finite ({losses}){'' if scaler is None else ' in fp16'}; "
                             f"nothing was saved for this step, so {RESUME_FILE} in --work keeps the last good one; "
                             f"expected finite losses ({hint})")
        if scaler is None:
            opt.step()
        else:   # an inf/nan gradient here is an fp16 overflow: GradScaler skips the step and halves the scale
            scaler.step(opt)
            scaler.update()
            skipped_in_a_row = 0 if finite else skipped_in_a_row + 1
            skipped_steps += not finite
            if scaler.get_scale() < MIN_LOSS_SCALE:
                raise InputError(f"step {step + 1}: the fp16 loss scale fell to {scaler.get_scale():g}, below "
                                 f"{MIN_LOSS_SCALE:g} ({skipped_in_a_row} steps in a row skipped for gradients that "
                                 f"overflow; {losses}): the run has diverged; {RESUME_FILE} in --work keeps the last "
                                 "save; expected finite gradients (lower --lr, --precision fp32, or check the shards)")
        step, ran = step + 1, ran + 1
        if step % s.log_every == 0 or step == s.steps:   # every rank: a failed append on rank 0 stops them all
            rate = ran * G / max(time.perf_counter() - t0, 1e-9)
            record = {"step": step, **parts, "lr": lr_at(step - 1, s), "samples_per_s": rate,
                      "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "precision": precision}
            if scaler is not None:
                record.update(loss_scale=scaler.get_scale(), skipped_steps=skipped_steps)
            distributed.on_main(world, lambda: _append_log(work / LOG_FILE, record), f"append to {LOG_FILE} in --work")
            say(f"step {step}/{s.steps} " + " ".join(f"{k} {v:.4f}" for k, v in parts.items()) + f" {rate:.1f} samples/s")
        if step % s.save_every == 0 or step == s.steps or ran == s.stop_after:
            distributed.on_main(world, lambda: _save_resume(resume, step, visual, opt, fingerprint, precision_state()),
                                f"save {RESUME_FILE} in --work")
    reader.shutdown(cancel_futures=True)

    def write_out() -> Path:
        meta = {"teacher": json.dumps({"model": manifest["teacher"]["model"], "file": manifest["teacher"]["file"]}),
                "data": json.dumps({"folder": Path(s.data).resolve().name,   # resolved: --data . named ''
                                    "samples": len(index), "shards": len(index.shards),
                                    "vae": manifest.get("vae", ""), "image_size": manifest.get("image_size")}),
                "steps": str(step), "samples_seen": str(step * G),
                "distill": json.dumps({k: v for k, v in asdict(s).items()
                                       if k in ("lr", "warmup", "weight_decay", "contrastive_weight", "init_vision", "seed")}
                                      | {"global_batch": G, "precision": precision}
                                      | ({"precision_history": history} if len(history) > 1 else {}))}
        written = save(student.float().eval(), out, dtype="fp16", force=s.force, metadata=meta)
        say(f"wrote {written} after {step} steps ({step - started} in this run)")
        return written

    written = distributed.on_main(world, write_out, "write --out") if step >= s.steps else None
    if world.size > 1:
        dist.barrier()
    distributed.finish()
    index.close()
    return written


def _make_folders(out: Path, work: Path) -> None:
    """The --out and --work folders, each failure one sentence naming its flag."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"--out folder '{out.parent}' cannot be created ({e.strerror or e})") from None
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"--work folder '{work}' cannot be created ({e.strerror or e}); expected a folder "
                         "for the resume checkpoint and log") from None


def _finite_everywhere(loss: torch.Tensor, world) -> bool:
    """The loss is finite on every rank: each rank's loss is its own, and all must stop together."""
    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=loss.device)
    if world.size > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bad.item()


def teacher_name(manifest: dict) -> str:
    return manifest.get("teacher", {}).get("model", "the teacher")
