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
    for name in ("per_prompt.png", "grid.png", "reward_curves.png", "safety.png", "summary.md"):
        assert (out / name).is_file() and str((out / name).resolve()) in printed.out
    assert "%" in printed.err  # the progress bar
    grid = Image.open(out / "grid.png")
    # three columns (baseline, ReNO latent, ReNO pixel), a row per image shown
    assert grid.width >= 3 * demo.CELL and grid.height >= demo.CELL
    curves = Image.open(out / "reward_curves.png")
    assert curves.width > 2 * 400 and curves.height == 300       # one panel per reward model, each its own axes
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


def test_grid_shows_images_where_the_methods_differ_taking_prompts_in_turn():
    # 3 prompts x 3 seeds, index k * 3 + i; the methods differ at (p0, s1), (p0, s2), (p2, s0) only
    base = [False] * 9
    latent = list(base)
    latent[1 * 3 + 0] = latent[2 * 3 + 0] = latent[0 * 3 + 2] = True
    verdicts = {"baseline": base, "reno_latent": latent, "reno_pixel": list(base)}
    assert demo.differing_items(verdicts, 3, 3, limit=6) == [3, 2, 6]    # p0's first, then p2's, then p0's second
    assert demo.differing_items(verdicts, 3, 3, limit=2) == [3, 2]
    same = {"baseline": base, "reno_latent": base}
    assert demo.differing_items(same, 3, 3, limit=2) == [0, 1]           # all agree: the first seeds, as before


def test_demo_grid_rows_are_items_where_verdicts_differ(tmp_path, reduced):
    s = demo.run_demo(tmp_path, iterations=2, quiet=True)
    n = len(s["prompts"])
    items = [(p, demo.SEED + i + n * k) for k in range(demo.SEEDS_PER_PROMPT) for i, p in enumerate(s["prompts"])]
    differ = [it for j, it in enumerate(items) if len({v[j] for v in s["verdicts"].values()}) > 1]
    if differ:
        assert s["grid_items"] and set(s["grid_items"]) <= set(differ)
    else:
        assert s["grid_items"] == items[:n]
    assert Image.open(tmp_path / "per_prompt.png").width == 720


def test_demo_refuses_a_folder_that_holds_files_unless_forced(tmp_path, reduced, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "summary.md").write_text("my notes")
    assert cli.main(["demo", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --out '{out}' exists and is not an empty folder")
    assert (out / "summary.md").read_text() == "my notes"
    assert cli.main(["demo", "--out", str(out), "--force"]) == 0
    assert (out / "summary.md").read_text().startswith("# Latent-CLIP mini-world demo")


def test_demo_into_a_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    assert cli.main(["demo", "--out", str(tmp_path / "a-file" / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
