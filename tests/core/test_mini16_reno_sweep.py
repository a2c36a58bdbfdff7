"""tools/mini16_reno_sweep.py: the sweep behind mini16's tuned ReNO settings reproduces the recorded score."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import mini16_reno_sweep as sweep  # noqa: E402


def test_the_half_run_on_the_evaluation_seeds_gives_the_recorded_score(capsys):
    from latentclip.miniworld import mini16
    runs = {"half": ["reno_latent", mini16.HALF_SETTINGS]}
    assert sweep.main(["--runs", json.dumps(runs), "--seeds", "0-3"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # docs/miniworld_mini16.md: reno_latent_half 24.9 on GenEval-mini's 268 images
    assert line["overall"] == pytest.approx(24.90, abs=0.01) and line["seeds"] == "0-3"


@pytest.mark.parametrize("argv", [["--runs", "[1]"], ["--runs", '{"a": ["reno_x", {}]}'],
                                  ["--runs", "{}", "--seeds", "5-2"], ["--runs", "{}", "--seeds", "a"]])
def test_bad_arguments_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        sweep.main(argv)
    assert e.value.code == 2 and "--" in capsys.readouterr().err
