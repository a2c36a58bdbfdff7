"""tools/mini16_geneval_sweep.py: the sweep behind mini16's tuned ReNO settings reproduces the recorded score; FK runs and another student file run through it."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import mini16_geneval_sweep as sweep  # noqa: E402


def _recorded(run: str) -> float:
    """GenEval-mini overall (%) of ``run`` in the shipped manifest's scores (eval --family mini16)."""
    manifest = json.loads((Path(__file__).resolve().parents[2] / "weights" / "mini16" / "manifest.json").read_text())
    return 100 * manifest["scores"]["geneval"][run]["overall"]


def _last_line(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_the_half_run_on_the_evaluation_seeds_gives_the_recorded_score(capsys):
    from latentclip.miniworld import mini16
    runs = {"half": ["reno_latent", mini16.HALF_SETTINGS]}
    assert sweep.main(["--runs", json.dumps(runs), "--seeds", "0-3"]) == 0
    line = _last_line(capsys)
    assert line["overall"] == pytest.approx(_recorded(mini16.HALF_RUN), abs=0.01) and line["seeds"] == "0-3"


def test_an_fk_run_with_the_folder_student_named_again_gives_the_recorded_score(capsys):
    """FK runs take FK overrides; ``--latent`` swaps the reward's student (here the folder's own file)."""
    from latentclip.miniworld import mini16
    latent = str(Path(__file__).resolve().parents[2] / "weights" / "mini16" / mini16.FILES["latent"])
    assert sweep.main(["--runs", json.dumps({"fk": ["fk_latent", {}]}), "--seeds", "0-3", "--latent", latent]) == 0
    line = _last_line(capsys)
    assert line["overall"] == pytest.approx(_recorded("fk_latent"), abs=0.01) and line["latent"] == mini16.FILES["latent"]


def test_verifiers_rank_the_same_particles_with_both_rewards(capsys):
    """--verifiers: per step, the judge's success of the particle each reward ranks first, on the same particles."""
    assert sweep.main(["--verifiers", "--seeds", "100"]) == 0
    line = _last_line(capsys)
    assert set(line["latent"]) == set(line["pixel"]) == {str(s) for s in range(1, 9)}
    assert line["seeds"] == "100-100" and 0 <= line["random"] <= 100
    # informed picks: the final step's pick beats picking at random for both rewards on these 67 prompts
    assert line["latent"]["8"] > line["random"] and line["pixel"]["8"] > line["random"]


@pytest.mark.parametrize("argv", [["--runs", "[1]"], ["--runs", '{"a": ["reno_x", {}]}'],
                                  ["--runs", '{"a": ["fk_latent", 3]}'],
                                  ["--runs", "{}", "--seeds", "5-2"], ["--runs", "{}", "--seeds", "a"],
                                  [], ["--runs", "{}", "--verifiers"]])
def test_bad_arguments_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        sweep.main(argv)
    assert e.value.code == 2 and "--" in capsys.readouterr().err
