"""``python -m latentclip demo`` on the committed weights, with a reduced setting (CI runs the full one)."""
from __future__ import annotations

import pytest
from PIL import Image

from latentclip import __main__ as cli
from latentclip.miniworld import demo
from latentclip.miniworld import geneval as G


@pytest.fixture
def reduced(monkeypatch):
    monkeypatch.setattr(demo, "PROMPTS", ("a red circle", "a green triangle to the left of a yellow circle"))
    monkeypatch.setattr(demo, "SAFETY_SEEDS", (200, 201))
    monkeypatch.setattr(demo, "SEEDS_PER_PROMPT", 2)
    monkeypatch.setitem(G.RENO, "iterations", 3)


def test_demo_command_writes_grid_curves_safety_and_summary(tmp_path, reduced, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    for name in ("grid.png", "reward_curves.png", "safety.png", "summary.md"):
        assert (out / name).is_file() and str((out / name).resolve()) in printed.out
    assert "%" in printed.err  # the progress bar
    grid = Image.open(out / "grid.png")
    # three columns (baseline, ReNO latent, ReNO pixel) and one row per prompt
    assert grid.width >= 3 * demo.CELL and grid.height >= 2 * demo.CELL
    assert Image.open(out / "reward_curves.png").size == (720, 360)
    md = (out / "summary.md").read_text()
    assert "ReNO Latent-CLIP" in md and "seconds / image" in md and "concept rate" in md
    assert "a green triangle to the left of a yellow circle" in md
    assert "2 prompts x 2 seeds = 4 images per run" in md and "sign test" in md and "95% interval" in md


def test_demo_judges_every_seed_of_every_prompt(tmp_path, reduced):
    s = demo.run_demo(tmp_path, iterations=2, quiet=True)
    assert all(len(v) == 4 for v in s["verdicts"].values())               # 2 prompts x 2 seeds
    for k, v in s["verdicts"].items():                                   # per-prompt counts add up to the items
        assert s["per_prompt"][k] == [v[0] + v[2], v[1] + v[3]]


def test_rate_interval_and_paired_sign_test():
    lo, hi = demo.wilson(24, 48)
    assert lo == pytest.approx(0.364, abs=1e-3) and hi == pytest.approx(0.636, abs=1e-3)
    assert demo.wilson(0, 48)[0] == 0.0 and demo.wilson(48, 48)[1] == pytest.approx(1.0)
    a = [True] * 10 + [False] * 10
    b = [False] * 10 + [False] * 10
    assert demo.sign_test(a, b) == (10, 0, pytest.approx(2 / 2 ** 10))   # 10 discordant pairs, all one way
    assert demo.sign_test(a, a) == (0, 0, 1.0)


def test_run_demo_returns_timings_and_reward_history(tmp_path, reduced):
    s = demo.run_demo(tmp_path, iterations=2, quiet=True)
    assert s["iterations"] == 2 and set(s["seconds"]) == {"baseline", "reno_latent", "reno_pixel"}
    assert all(v > 0 for v in s["seconds"].values())
    assert set(s["safety"]) == {"baseline", "guidance", "reno_avoid"}
    assert all(0 <= v["concept_rate"] <= 1 for v in s["safety"].values())
