"""``python -m latentclip encode``: images -> WebDataset shards of VAE latents and teacher embeddings.

The distillation data. Each image is resized (shorter side) and centre-cropped to ``--size``
pixels; the user's VAE, loaded by ComfyUI's own loader (``comfy_vae``), encodes the crop to the raw
latent a ComfyUI LATENT would hold, and the teacher (any open_clip model from a local weights file,
never downloaded) embeds the same crop. Input: a folder of images (captions from ``NAME.txt``
beside them) or WebDataset tars as img2dataset writes them (``KEY.jpg``/``.png``/``.webp``,
``KEY.txt``, ``KEY.json``). Output: ``shards.py``'s format, one output shard per input tar (or per
``--shard-size`` images of a folder), written atomically, so a rerun skips finished shards. Under
torchrun (or SLURM) every rank takes every WORLD_SIZE-th shard on its own GPU.
"""
from __future__ import annotations

import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .train import distributed
from .families import get_family
from .train.shards import (FORMAT, MANIFEST, Sample, atomic_write, tar_members,
                           write_shard)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


@dataclass
class Job:
    """One output shard and the samples it is made from: (key, image path or (tar, span), caption, meta).

    A tar's members are listed only when its shard is encoded (``items()``), so a rank never reads
    the inputs of other ranks' or finished shards."""
    out_name: str
    listed: list | None = None
    tar: Path | None = None

    def items(self) -> list:
        if self.listed is None:
            self.listed = _tar_items(self.tar)
        return self.listed


def _apple_double(path: Path) -> bool:
    """macOS' ``._NAME.jpg`` beside a file copied to another disk or zipped (``__MACOSX/``): its metadata, not an
    image. Told by its magic number, so a real image named ``._x.png`` is still encoded (and no earlier run
    encoded one of these: it stopped there as undecodable)."""
    if not path.name.startswith("._"):
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x00\x05\x16\x07"
    except OSError:   # unreadable: left in, so decoding it names the file
        return False


def _folder_jobs(folder: Path, shard_size: int, first: int = 0) -> list:
    images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS
                    and not _apple_double(p))
    items, seen = [], {}
    for p in images:
        rel = p.relative_to(folder).with_suffix("")
        key = "_".join(rel.parts).replace(".", "_")
        if key in seen:
            raise InputError(f"images '{seen[key].relative_to(folder)}' and '{p.relative_to(folder)}' in '{folder}' would "
                             f"share the sample key {key!r}; rename one of them")
        seen[key] = p
        caption_file = p.with_suffix(".txt")
        caption = caption_file.read_bytes().decode("utf-8", "replace").strip() if caption_file.is_file() else None
        items.append((key, p, caption or None, {}))
    return [Job(f"{first + i // shard_size:06d}.tar", items[i:i + shard_size]) for i in range(0, len(items), shard_size)]


def _tar_items(path: Path) -> list:
    members = tar_members(path)
    items = []
    with open(path, "rb") as f:
        def read(span):
            f.seek(span[0])
            return f.read(span[1])
        for key, parts in members.items():
            ext = next((e for e in IMAGE_EXTS if e in parts), None)
            if ext is None:
                # the key ends at the first dot: 'IMG_2023.05.01.jpg' is key 'IMG_2023', extension '05.01.jpg'
                dotted = next((e for e in parts if e.rpartition(".")[2] in IMAGE_EXTS), None)
                if dotted is not None:
                    raise InputError(f"shard '{path.name}' holds '{key}.{dotted}', whose WebDataset key '{key}' ends at "
                                     "its first dot and has no image of its own; expected img2dataset's KEY.jpg "
                                     "(file names without dots), or give the images as a folder")
                continue  # img2dataset writes a .json (and .txt) for failed downloads too
            caption = read(parts["txt"]).decode("utf-8", "replace").strip() if "txt" in parts else None
            try:
                meta = json.loads(read(parts["json"])) if "json" in parts else {}
            except ValueError:
                meta = {}
            items.append((key.replace(".", "_"), (path, parts[ext]), caption or None, meta if isinstance(meta, dict) else {}))
    keys = [k for k, _, _, _ in items]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise InputError(f"shard '{path.name}' holds two samples whose keys both read {dup!r}; expected unique keys")
    return items


def plan_jobs(inputs, shard_size: int = 1000) -> list:
    """The output shards to make from folders of images and/or WebDataset tars, in a fixed order."""
    jobs, source, folder_shards = [], {}, 0
    resolved = [Path(given).resolve() for given in inputs]
    for i, a in enumerate(resolved):   # folders are read to any depth: its images would be encoded twice
        twice = next((inputs[j] for j, b in enumerate(resolved) if j != i and (a == b or a in b.parents)), None)
        if twice is not None:
            raise InputError(f"input '{inputs[i]}' holds input '{twice}' (or is it); expected each folder once")
    for given in inputs:
        path = Path(given)
        tars = [path] if path.is_file() else sorted(path.glob("*.tar")) if path.is_dir() else []
        if path.is_file() and path.suffix != ".tar":
            raise InputError(f"input '{given}' is a file but not a .tar shard; expected a folder of images or .tar shards")
        if tars:
            made = [Job(t.name, tar=t) for t in tars]
        elif path.is_dir():   # numbered on from the folders before it: each folder's first shard was 000000.tar
            made = _folder_jobs(path, shard_size, folder_shards)
            folder_shards += len(made)
        else:
            raise InputError(f"input '{given}' does not exist; expected a folder of images or WebDataset .tar shards")
        for job in made:
            here = job.tar or given
            if job.out_name in source:
                raise InputError(f"inputs '{source[job.out_name]}' and '{here}' would both write shard {job.out_name} "
                                 "to --out; expected inputs whose .tar shards have distinct names (rename one)")
            source[job.out_name] = here
        jobs += made
    if not jobs:
        raise InputError(f"no images found in {', '.join(map(str, inputs))}; expected {', '.join(IMAGE_EXTS)} files")
    return jobs


#: EXIF orientation (tag 0x0112) -> the transpose that shows the photo as a camera and every viewer do
_ORIENTATIONS = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
                 7: "TRANSVERSE", 8: "ROTATE_90"}
#: an image resized to more than this many crop sides long (a 1 x 4000 banner at --size 512: 2M x 512 pixels,
#: gigabytes) is resized straight into its crop instead; every other image keeps the resize-then-crop of old
_MAX_STRETCH = 64


def _picture(img):
    """The RGB picture a viewer shows. Only images that came out wrong before are treated differently (the
    shards of a resumed run must match the earlier ones): EXIF-rotated photos are turned upright, 16-bit
    grayscale (which ``convert`` clips to white) is scaled to 8 bits, and transparent pixels (whose hidden
    colour is arbitrary, often black) are composited on white, as img2dataset does."""
    from PIL import Image
    img.load()   # a damaged file fails here, before getexif() (which may load it too) swallows the error
    try:
        orientation = int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a damaged EXIF block: the pixels as stored, as before
        orientation = 1
    if img.mode == "I" or img.mode.startswith("I;16"):   # a 16-bit grayscale PNG (older Pillow: mode "I")
        img = Image.fromarray(np.clip(np.rint(np.asarray(img, dtype=np.float64) / 257), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    img = img.convert("RGB")
    if orientation in _ORIENTATIONS:
        img = img.transpose(getattr(Image.Transpose, _ORIENTATIONS[orientation]))
    return img


def load_image(source, size: int) -> torch.Tensor:
    """[size, size, 3] float in [0, 1]: RGB, shorter side resized to ``size``, centre crop."""
    from PIL import Image
    import io
    name = str(source) if isinstance(source, Path) else f"{source[0].name} at byte {source[1][0]}"
    try:
        if isinstance(source, Path):
            opened = Image.open(source)
        else:
            path, (offset, length) = source
            with open(path, "rb") as f:
                f.seek(offset)
                opened = Image.open(io.BytesIO(f.read(length)))
        with opened:   # an animated image keeps its file open until closed
            img = _picture(opened)
    except Image.DecompressionBombError as e:   # an image, but one PIL refuses to decode: say so, not "not an image"
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise InputError(f"image {name} is too large to decode ({f'{int(found[1]):,} pixels' if found else str(e)[:100]}); "
                         f"expected an image of at most {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels, PIL's guard against "
                         "decompression bombs: downscale it or remove it") from None
    except (OSError, ValueError) as e:
        raise InputError(f"image {name} could not be decoded ({str(e)[:100]}); expected a JPEG/PNG/WebP image") from None
    w, h = img.size
    scale = size / min(w, h)
    w2, h2 = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (w2 - size) // 2, (h2 - size) // 2
    if max(w2, h2) <= _MAX_STRETCH * size:
        img = img.resize((w2, h2), Image.BICUBIC).crop((left, top, left + size, top + size))
    else:   # the same centre crop of the same resize, without making the whole resized image first
        sx, sy = w / w2, h / h2
        img = img.resize((size, size), Image.BICUBIC, box=(left * sx, top * sy, (left + size) * sx, (top + size) * sy))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)


class Teacher:
    """An open_clip pixel CLIP from a local file: L2-normalised image embeddings of RGB crops."""

    def __init__(self, path, model_name: str | None, device: torch.device):
        import open_clip
        from .train.distill import load_teacher, teacher_fingerprint
        teacher = load_teacher(path, model_name)
        self.fingerprint = teacher_fingerprint(teacher.model)
        self.model, self.name = teacher.model.to(device), teacher.name
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        size = cfg.get("size", 224)
        self.size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD), device=device).view(1, 3, 1, 1)
        self.embed_dim = int(self.model.text_projection.shape[-1]) if hasattr(self.model, "text_projection") else \
            int(self.model.visual.output_dim)
        self.device = device

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[B, E] float32 unit vectors for RGB images [B, H, W, 3] in [0, 1]."""
        x = images.to(self.device).permute(0, 3, 1, 2)
        x = F.interpolate(x, size=self.size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        feats = self.model.encode_image((x - self.mean) / self.std)
        return F.normalize(feats.float(), dim=-1).cpu()


def _manifest(args, family, teacher) -> dict:
    side = args.size // family.factor
    return {"format": FORMAT, "version": 1, "family": family.name, "vae": Path(args.vae).name,
            "image_size": args.size, "latent_shape": [family.channels, side, side],
            "teacher": {"model": teacher.name, "file": Path(args.teacher).name, "embed_dim": teacher.embed_dim,
                        "fingerprint": teacher.fingerprint}}


def _check_manifest(out: Path, manifest: dict) -> None:
    """Refuse an --out whose encode.json records other settings; write it when missing. Every rank writes it
    (the same bytes, each through its own temp file), before any shard of its own: were only rank 0 to write
    it, a rank 0 that died first would leave other ranks' shards without it, and every rerun refused."""
    path = out / MANIFEST
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"'{path}' could not be read as JSON ({type(e).__name__}); encode into a new --out folder") from None
        if isinstance(old, dict) and "fingerprint" not in old.get("teacher", {}):   # written before fingerprints
            manifest = {**manifest, "teacher": {k: v for k, v in manifest["teacher"].items() if k != "fingerprint"}}
        if old != manifest:
            diff = [k for k in manifest if old.get(k) != manifest[k]]
            raise InputError(f"--out '{out}' already holds shards made with other settings ({', '.join(diff)}: "
                             f"{[old.get(k) for k in diff]}); use another --out folder to resume into")
    else:
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8"))


def _check_out(out: Path, inputs) -> None:
    """--out is a new folder, an empty one, or an earlier run's (with its manifest), apart from every input."""
    target = out.resolve()
    for given in inputs:
        folder = Path(given).resolve()
        if target == (folder.parent if folder.is_file() else folder):   # its shards would take the inputs' names
            raise InputError(f"--out '{out}' is the folder of input '{given}'; give another folder for the shards")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out '{out}' is a file; expected a folder for the shards")
    # another rank may be writing the manifest (MANIFEST.tmpPID) right now: that is not a stranger's file
    if out.is_dir() and not (out / MANIFEST).is_file() and any(not e.name.startswith(MANIFEST) for e in out.iterdir()):
        raise InputError(f"--out '{out}' holds files but no {MANIFEST}; give a new or empty folder, or the --out of "
                         "an earlier encode run to resume it")


def _check_finished(path: Path, job: Job) -> None:
    """A shard already in --out must hold the images this run plans for it: a folder that gained images, or
    another --shard-size, would otherwise skip some and encode others twice."""
    there, planned = set(tar_members(path)), {key for key, _, _, _ in job.items()}
    if there != planned:
        raise InputError(f"--out shard '{path.name}' holds {len(there)} samples but the inputs now give it {len(planned)} "
                         f"({len(there ^ planned)} keys differ): the inputs or --shard-size changed since it was "
                         "written; encode into a new --out folder")


def _check_finite(values: torch.Tensor, chunk, job, what: str, expected: str) -> None:
    """Refuse NaN or infinite outputs here, naming the images, rather than in a shard the trainer
    meets hours later."""
    bad = [key for (key, _, _, _), v in zip(chunk, values) if not torch.isfinite(v).all()]
    if bad:
        raise InputError(f"{what} gave NaN or infinite values for {len(bad)} of {len(chunk)} images of shard "
                         f"{job.out_name} (first: '{bad[0]}'); expected finite {expected}")


def encode(args, log=print) -> list:
    """Encode every shard this rank owns that is not on disk yet; returns the shards written."""
    world = distributed.world_from_env()
    device = distributed.pick_device(world, args.device)
    family = get_family(args.family)
    if args.size % family.factor or args.size < family.factor:
        raise InputError(f"--size {args.size} is not a multiple of family {family.name!r}'s factor {family.factor}")
    out = Path(args.out)
    _check_out(out, args.input)
    jobs = plan_jobs(args.input, args.shard_size)
    mine = [j for i, j in enumerate(jobs) if i % world.size == world.rank]
    finished = [(out / j.out_name).exists() for j in mine]
    done = [j for j, f in zip(mine, finished) if f]
    todo = [j for j, f in zip(mine, finished) if not f]
    teacher = Teacher(args.teacher, args.teacher_model, device)
    manifest = _manifest(args, family, teacher)
    out.mkdir(parents=True, exist_ok=True)
    _check_manifest(out, manifest)
    for job in done:
        _check_finished(out / job.out_name, job)
    log(f"rank {world.rank}/{world.size}: {len(mine)} of {len(jobs)} shards, {len(mine) - len(todo)} already done, "
        f"{len(todo)} to encode on {device}")
    if not todo:
        return []
    from .comfy_vae import ComfyVAE
    vae = ComfyVAE(args.vae, args.comfyui, device)
    vae.check_family(family)
    written, start, done = [], time.perf_counter(), 0
    workers = args.workers
    decoders = ThreadPoolExecutor(workers) if workers > 0 else None
    ahead = ThreadPoolExecutor(1) if workers > 0 else None
    try:
        for n, job in enumerate(todo):
            path, count = _encode_job(args, out, job, vae, teacher, decoders, ahead)
            written.append(path)
            done += count
            rate = done / max(time.perf_counter() - start, 1e-9)
            log(f"rank {world.rank}: {job.out_name} ({count} images) {n + 1}/{len(todo)} shards, {rate:.2f} images/s")
    finally:
        for pool in (ahead, decoders):
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    return written


def decoded_batches(items, batch: int, size: int, decoders=None, ahead=None):
    """(chunk, [B, size, size, 3] images) for each ``batch`` items of a shard, in order. With thread pools,
    the next chunk is decoded (by ``decoders``' threads, image by image) while the caller encodes this one,
    so PIL's decoding and resizing overlap the VAE and the teacher; the images and errors are the same."""
    chunks = [items[i:i + batch] for i in range(0, len(items), batch)]

    def load(chunk):
        sources = [src for _, src, _, _ in chunk]
        decoded = decoders.map(lambda s: load_image(s, size), sources) if decoders else (load_image(s, size) for s in sources)
        return torch.stack(list(decoded))
    if ahead is None:
        for chunk in chunks:
            yield chunk, load(chunk)
        return
    pending = ahead.submit(load, chunks[0]) if chunks else None
    for k, chunk in enumerate(chunks):
        images = pending.result()
        pending = ahead.submit(load, chunks[k + 1]) if k + 1 < len(chunks) else None
        yield chunk, images


def _encode_job(args, out: Path, job, vae, teacher, decoders, ahead) -> tuple[Path, int]:
    """Encode one shard's images and write it; returns its path and how many images it holds."""
    samples = []
    for chunk, images in decoded_batches(job.items(), args.batch, args.size, decoders, ahead):
        latents = vae.encode(images)
        _check_finite(latents, chunk, job, "the VAE", "latents (a VAE in half precision can overflow: try its "
                                                      "fp32 weights or --device cpu)")
        embeds = teacher.embed(images)
        _check_finite(embeds, chunk, job, "the teacher", "image embeddings")
        for (key, _, caption, meta), lat, emb in zip(chunk, latents, embeds):
            samples.append(Sample(key, lat.numpy(), emb.numpy(), caption, meta))
    write_shard(out / job.out_name, samples)
    return out / job.out_name, len(samples)


def add_arguments(p) -> None:
    p.add_argument("input", nargs="+", help="folders of images (captions in NAME.txt) or WebDataset .tar shards")
    p.add_argument("--out", required=True, help="folder for the latent shards (a rerun resumes there)")
    p.add_argument("--vae", required=True, help="the VAE file (e.g. ComfyUI/models/vae/ae.safetensors)")
    p.add_argument("--family", required=True, help="its VAE family (sd1, sdxl, sd3, flux, wan21, ...)")
    p.add_argument("--teacher", required=True, help="the pixel CLIP's open_clip weights file (.safetensors/.bin)")
    p.add_argument("--teacher-model", default=None, help="its open_clip architecture, e.g. ViT-B-32 (default: inferred)")
    p.add_argument("--comfyui", default=None, help="ComfyUI tree (default: $COMFYUI_PATH)")
    p.add_argument("--size", type=int, default=512, help="square crop side in pixels (default 512)")
    p.add_argument("--batch", type=int, default=16, help="images per VAE/teacher batch")
    p.add_argument("--shard-size", type=int, default=1000, help="images per output shard for folder input")
    p.add_argument("--device", default=None, help="default: this rank's GPU (LOCAL_RANK), else the CPU")
    p.add_argument("--workers", type=int, default=4, help="threads decoding the next batch's images while this one "
                   "encodes (0: decode in turn; default 4)")


def main(args) -> int:
    if args.batch < 1 or args.shard_size < 1:
        raise InputError(f"--batch {args.batch} and --shard-size {args.shard_size} must be at least 1")
    if args.workers < 0:
        raise InputError(f"--workers {args.workers}: expected 0 (decode in turn) or more threads")
    encode(args, log=lambda m: print(m, file=sys.stderr, flush=True))
    return 0
