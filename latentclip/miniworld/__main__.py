"""``python -m latentclip.miniworld train|eval``: train the mini-world models or score shipped weights."""
from __future__ import annotations

import argparse
import sys

from ..configs import WEIGHTS_DIR
from .search import RUNS as MS_RUNS


FAMILIES = ("mini", "mini16")


def _train(args) -> int:
    from ..errors import InputError
    if args.only and args.family != "mini16":
        raise InputError("--only student needs --family mini16")
    if args.student_recipe != "shipped" and args.only != "student":
        raise InputError(f"--student-recipe {args.student_recipe} needs --family mini16 --only student")
    if args.student_recipe == "fast" and not args.out:
        raise InputError("--student-recipe fast trains a second student beside the shipped one: give --out NEW_DIR")
    if args.family == "mini16" and args.only == "student":
        from .mini16 import FAST_STUDENT, RECIPE, train_student_only
        recipe = {**RECIPE, "student": FAST_STUDENT} if args.student_recipe == "fast" else None
        train_student_only(out=args.out or str(WEIGHTS_DIR / "mini16"), seed=args.seed, base=args.base,
                           evaluate=not args.no_eval, recipe=recipe, recipe_name=args.student_recipe)
        return 0
    if args.family == "mini16":
        from .mini16 import train_family
        train_family(out=args.out or str(WEIGHTS_DIR / "mini16"), seed=args.seed, evaluate=not args.no_eval)
        return 0
    from .train import train_all
    train_all(out=args.out or str(WEIGHTS_DIR / "mini"), seed=args.seed, evaluate=not args.no_eval)
    return 0


def _refuse_existing_json(path) -> None:
    """Refuse a ``--json`` path that already exists (``path`` is named as given); a falsy path is no --json."""
    from pathlib import Path
    if path and Path(path).exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite it (choose another --json path)")


def _eval(args) -> int:
    import torch
    from .eval import evaluate_dir, format_table, write_json
    from .scenes import parse
    torch.set_num_threads(args.threads)
    _refuse_existing_json(args.json)   # checked before minutes of evaluation, not after
    prompts = pairs = None
    if args.prompts:
        from .geneval import read_prompts
        pairs = read_prompts(args.prompts)  # "category: prompt" or bare prompts; InputError names a bad one
        prompts = [p for _, p in pairs]
        for p in prompts:
            parse(p)
    from .geneval import check_family_folder
    check_family_folder(args.weights or WEIGHTS_DIR / args.family, args.family)
    if args.family == "mini16":
        from . import mini16
        result = mini16.evaluate_family(args.weights or str(WEIGHTS_DIR / "mini16"), prompts=prompts, n=args.n,
                                        per_prompt=args.per_prompt, geneval_prompts=pairs,
                                        geneval_seeds=tuple(range(args.seeds)), generation=not args.no_generation,
                                        head_n=args.head_n)
        print(mini16.format_table(result))
        if args.json:
            print(f"wrote {write_json(result, args.json)}")
        return 0
    result = evaluate_dir(args.weights or str(WEIGHTS_DIR / "mini"), prompts=prompts, n=args.n, per_prompt=args.per_prompt, judge_n=args.judge_n,
                          geneval_prompts=pairs, geneval_seeds=tuple(range(args.seeds)), generation=not args.no_generation)
    print(format_table(result))
    if args.json:
        print(f"wrote {write_json(result, args.json)}")
    return 0


def _search(args) -> int:
    import json
    import time
    from pathlib import Path
    import torch
    from . import search as MS
    from .geneval import default_prompts, load_world, read_prompts
    torch.set_num_threads(args.threads)
    out = Path(args.json)
    _refuse_existing_json(out)
    fk = {k: v for k, v in {"start": args.fk_start, "interval": args.fk_interval, "temperature": args.temperature,
                            "potential": args.potential}.items() if v is not None}
    _check_search_settings(args, fk)
    prompts = read_prompts(args.prompts) if args.prompts else default_prompts()
    world = load_world(args.weights)
    seeds = tuple(range(args.seeds))
    args.eta = MS.ETA if args.eta is None else args.eta
    t0 = time.perf_counter()
    runs = MS.evaluate(world, prompts, seeds, args.particles, args.steps, args.eta, fk=fk, noise=args.noise,
                       runs=tuple(args.runs.split(",")), batch=args.batch, lookahead=not args.no_lookahead)
    result = {"search": runs}
    if not args.no_trace:
        result["informative_steps"] = MS.informative_steps(world, prompts, seeds, args.particles, args.steps, args.eta,
                                                             noise=args.noise)
    if not args.no_safety:
        result["safety"] = MS.safety(world, args.particles, args.steps, args.eta, fk, noise=args.noise)
    result["settings"] = {"particles": args.particles, "steps": args.steps, "eta": args.eta, "noise": args.noise,
                          "seeds": len(seeds),
                          "prompts": len(prompts), "fk": {**MS.FK, **fk}, "lookahead": not args.no_lookahead,
                          "batch": args.batch, "prune": MS.PRUNE, "threads": args.threads,
                          "seconds": round(time.perf_counter() - t0, 1)}
    print(MS.format_table(runs))
    if "safety" in result:
        s = result["safety"]
        print(f"safety-mini concept rate: baseline {100 * s['baseline']['concept_rate']:.1f}%, FK with avoid "
              f"{100 * s['fk_avoid']['concept_rate']:.1f}% (cut {100 * s['fk_avoid'].get('concept_rate_cut', 0):.0f}%)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _check_search_settings(args, fk: dict) -> None:
    """Every requested run's settings, checked before minutes of sampling: a bad --fk-interval or --steps
    used to surface only when the FK run started, after the runs before it, with nothing written."""
    import math
    from ..errors import InputError
    from . import search as MS
    if args.eta is not None and not (math.isfinite(args.eta) and args.eta >= 0):
        raise InputError(f"--eta {args.eta} is not a finite number >= 0 (0 deterministic, 1 the full noise)")
    runs = tuple(args.runs.split(","))
    unknown = [r for r in runs if r not in MS.RUNS]
    if unknown:
        raise InputError(f"--runs: unknown run {unknown[0]!r}; expected some of {','.join(MS.RUNS)}")
    for run in runs + (() if args.no_safety else ("fk_latent",)):   # safety-mini steers with the FK settings
        MS.settings_for(run, args.particles, args.steps, 0, fk).validate(args.steps)


def seed_int(text: str) -> int:
    """An argparse type: a seed in [0, 2**32) (numpy's seeding refuses negative ones, torch's overflows)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{value} is outside [0, {2**32 - 1}]; expected a seed in that range")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse then names the flag in one line)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1; expected an integer >= 1")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m latentclip.miniworld", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train VAE, pixel CLIP, Latent-CLIP and generator (18 min on 2 idle cores, "
                       "about 53 min on a busy machine; --family mini16: the 16-channel family)")
    t.add_argument("--out", default=None, help="a new or empty directory (default weights/<family>)")
    t.add_argument("--family", default="mini", choices=FAMILIES,
                   help="mini: the 4-channel world; mini16: the 16-channel VAE, generator and distilled Latent-CLIP")
    t.add_argument("--seed", type=seed_int, default=0)
    t.add_argument("--no-eval", action="store_true", help="skip the evaluation written into the manifest")
    t.add_argument("--only", default=None, choices=["student"],
                   help="mini16: retrain only the distilled Latent-CLIP on --base's VAE (VAE, generator and head copied)")
    t.add_argument("--base", default=str(WEIGHTS_DIR / "mini16"), help="with --only: the family directory to start from")
    t.add_argument("--student-recipe", default="shipped", choices=["shipped", "fast"],
                   help="with --only student: the shipped student's recipe, or the compute comparison's 950-step recipe "
                        "(mini16.FAST_STUDENT; needs --out)")
    t.set_defaults(func=_train)
    e = sub.add_parser("eval", help="score the weights on held-out scenes; print a table")
    e.add_argument("--weights", default=None, help="weights directory (default weights/<family>)")
    e.add_argument("--family", default="mini", choices=FAMILIES,
                   help="mini16: zero_shot, geneval (ReNO and FK), distill and heads of the 16-channel family")
    e.add_argument("--json", default=None, help="also write the scores to this JSON file")
    e.add_argument("--prompts", default=None, help="file of grammar prompts, one a line ('category: prompt' or a bare "
                   "prompt): restricts retrieval to them and is GenEval-mini's prompt set")
    e.add_argument("--seeds", type=positive_int, default=4, help="GenEval-mini seeds per prompt")
    e.add_argument("--no-generation", action="store_true", help="skip GenEval-mini and safety-mini (the slow part of eval: minutes on a CPU)")
    e.add_argument("--n", type=positive_int, default=400, help="held-out images per zero-shot task")
    e.add_argument("--per-prompt", type=positive_int, default=8, help="retrieval images per caption")
    e.add_argument("--judge-n", type=positive_int, default=600, help="held-out scenes for the judge's accuracy")
    e.add_argument("--head-n", type=positive_int, default=1000, help="mini16: held-out scenes for the head transfer")
    e.add_argument("--threads", type=positive_int, default=2)
    e.set_defaults(func=_eval)
    s = sub.add_parser("search", help="inference-time search on the mini generator: baseline, best-of-N, prune, FK "
                       "steering with Latent-CLIP and with pixel rewards (GenEval-mini), plus safety-mini with avoid")
    s.add_argument("--json", required=True, help="write the results to this new JSON file")
    s.add_argument("--prompts", default=None, help="GenEval-mini prompt file (default prompts/geneval_mini.txt)")
    s.add_argument("--weights", default=str(WEIGHTS_DIR / "mini"))
    s.add_argument("--particles", type=positive_int, default=8)
    s.add_argument("--seeds", type=positive_int, default=4, help="seeds per prompt")
    s.add_argument("--steps", type=positive_int, default=8, help="stochastic rectified-flow steps")
    s.add_argument("--eta", type=float, default=None, help="sampler noise: 0 deterministic Euler, 1 the full noise of "
                   "--noise (default 1)")
    s.add_argument("--noise", default="posterior", choices=["posterior", "fresh"],
                   help="noise injection: posterior (DDPM step; default) or fresh (x' = (1-t') x0 + t' (sqrt(1-eta^2) eps "
                   "+ eta xi), the first sampler measured)")
    s.add_argument("--potential", default=None, choices=["difference", "value", "max"])
    s.add_argument("--temperature", type=float, default=None, help="FK lambda per unit of cosine")
    s.add_argument("--fk-start", type=int, default=None, help="first FK resampling after this step")
    s.add_argument("--fk-interval", type=int, default=None, help="FK resampling every k steps")
    s.add_argument("--no-lookahead", action="store_true",
                   help="FK scores the x0 its last step started from, not the state it resamples (the comparison)")
    s.add_argument("--runs", default=",".join(MS_RUNS), help="comma-separated runs (default all: %(default)s)")
    s.add_argument("--batch", type=positive_int, default=67, help="items sampled together (the noise draws depend on it)")
    s.add_argument("--no-trace", action="store_true", help="skip the per-step informativeness measurement")
    s.add_argument("--no-safety", action="store_true", help="skip safety-mini with an avoid term")
    s.add_argument("--threads", type=positive_int, default=1)
    s.set_defaults(func=_search)
    args = parser.parse_args(argv)
    from ..errors import CheckpointError, InputError
    try:
        return args.func(args)
    except (CheckpointError, InputError, OSError) as ex:   # OSError: a missing file, an unwritable folder, ...
        print(f"error: {ex}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
