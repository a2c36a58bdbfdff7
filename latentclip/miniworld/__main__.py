"""``python -m latentclip.miniworld train|eval``: train the mini-world models or score shipped weights."""
from __future__ import annotations

import argparse
import sys

from ..configs import WEIGHTS_DIR


def _train(args) -> int:
    from .train import train_all
    train_all(out=args.out, seed=args.seed, evaluate=not args.no_eval)
    return 0


def _eval(args) -> int:
    import torch
    from .eval import evaluate_dir, format_table, write_json
    from .scenes import parse
    torch.set_num_threads(args.threads)
    prompts = pairs = None
    if args.prompts:
        from .geneval import read_prompts
        pairs = read_prompts(args.prompts)  # "category: prompt" or bare prompts; InputError names a bad one
        prompts = [p for _, p in pairs]
        for p in prompts:
            parse(p)
    result = evaluate_dir(args.weights, prompts=prompts, n=args.n, per_prompt=args.per_prompt, judge_n=args.judge_n,
                          geneval_prompts=pairs, geneval_seeds=tuple(range(args.seeds)), generation=not args.no_generation)
    print(format_table(result))
    if args.json:
        print(f"wrote {write_json(result, args.json)}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m latentclip.miniworld", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train VAE, pixel CLIP, Latent-CLIP and generator (about 60 min on 2 cores)")
    t.add_argument("--out", default=str(WEIGHTS_DIR / "mini"), help="a new or empty directory")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-eval", action="store_true", help="skip the evaluation written into the manifest")
    t.set_defaults(func=_train)
    e = sub.add_parser("eval", help="score the weights on held-out scenes; print a table")
    e.add_argument("--weights", default=str(WEIGHTS_DIR / "mini"))
    e.add_argument("--json", default=None, help="also write the scores to this JSON file")
    e.add_argument("--prompts", default=None, help="file of grammar prompts, one a line ('category: prompt' or a bare "
                   "prompt): restricts retrieval to them and is GenEval-mini's prompt set")
    e.add_argument("--seeds", type=int, default=4, help="GenEval-mini seeds per prompt")
    e.add_argument("--no-generation", action="store_true", help="skip GenEval-mini and safety-mini (about 10 min)")
    e.add_argument("--n", type=int, default=400, help="held-out images per zero-shot task")
    e.add_argument("--per-prompt", type=int, default=8, help="retrieval images per caption")
    e.add_argument("--judge-n", type=int, default=600, help="held-out scenes for the judge's accuracy")
    e.add_argument("--threads", type=int, default=2)
    e.set_defaults(func=_eval)
    args = parser.parse_args(argv)
    from ..errors import CheckpointError, InputError
    try:
        return args.func(args)
    except (CheckpointError, InputError, FileExistsError, FileNotFoundError) as ex:
        print(f"error: {ex}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
