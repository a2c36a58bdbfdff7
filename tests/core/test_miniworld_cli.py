"""``python -m latentclip.miniworld``: bad arguments are one line naming them, never a traceback or a leftover."""
import pytest

from latentclip.configs import WEIGHTS_DIR
from latentclip.miniworld.__main__ import main


@pytest.mark.parametrize("argv, says", [
    (["eval", "--threads", "0", "--no-generation"], "argument --threads: 0 is below 1"),
    (["eval", "--n", "0", "--no-generation"], "argument --n: 0 is below 1"),
    (["search", "--json", "x.json", "--seeds", "0"], "argument --seeds: 0 is below 1")])
def test_counts_below_one_are_refused_by_the_parser(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_an_unreadable_prompt_file_is_one_line(tmp_path, capsys):
    (tmp_path / "bin.txt").write_bytes(b"\xbb\xff\x00")
    for path in (tmp_path, tmp_path / "bin.txt"):
        assert main(["eval", "--prompts", str(path), "--no-generation", "--n", "2"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: prompt file {path} cannot be read")
    (tmp_path / "bad.txt").write_text("a red circle\na purple unicorn\n")
    assert main(["eval", "--prompts", str(tmp_path / "bad.txt"), "--no-generation", "--n", "2"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'bad.txt'}:2: ")


def test_a_weights_folder_of_the_other_family_says_which_it_is(tmp_path, capsys):
    assert main(["eval", "--weights", str(WEIGHTS_DIR / "mini16"), "--no-generation", "--n", "2"]) == 2
    assert "is not a mini weights folder (it holds the mini16 family: pass --family mini16)" in capsys.readouterr().err
    out = tmp_path / "new16"
    assert main(["train", "--family", "mini16", "--only", "student", "--out", str(out),
                 "--base", str(WEIGHTS_DIR / "mini")]) == 2
    assert "--base" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []                               # no temporary folder left


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_a_seed_numpy_or_torch_cannot_take_is_refused_by_the_parser(seed, tmp_path, capsys):
    """A negative seed passed the parser, started both workers and failed in each with numpy's traceback."""
    with pytest.raises(SystemExit) as e:
        main(["train", "--seed", seed, "--out", str(tmp_path / "new"), "--no-eval"])
    assert e.value.code == 2 and f"argument --seed: {int(seed)} is outside [0, 4294967295]" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, says", [
    (["--fk-interval", "0"], "interval must be an integer >= 1"),
    (["--fk-start", "8"], "must be below the sampler's 8 steps"),
    (["--temperature", "nan"], "temperature (lambda) must be a finite number"),
    (["--steps", "1"], "schedule of 1 step"),
    (["--eta", "-1"], "--eta -1.0 is not a finite number >= 0"),
    (["--runs", "baseline,fk"], "unknown run 'fk'")])
def test_search_settings_are_checked_before_any_sampling(argv, says, tmp_path, capsys):
    """These were found when the FK run began, after minutes of the runs before it, with nothing written;
    the settings are now checked first (here before the missing --weights folder is even read)."""
    out = tmp_path / "s.json"
    assert main(["search", "--json", str(out), "--weights", str(tmp_path / "absent")] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and not out.exists()


@pytest.mark.parametrize("family", ["mini", "mini16"])
def test_eval_refuses_an_existing_json_before_evaluating(tmp_path, capsys, monkeypatch, family):
    """eval --json wrote over an existing file, and only after the whole evaluation."""
    from latentclip.miniworld import eval as E, mini16
    from latentclip.miniworld.__main__ import main

    def evaluated(*a, **k):
        raise AssertionError("evaluated before refusing the --json path")
    monkeypatch.setattr(E, "evaluate_dir", evaluated)
    monkeypatch.setattr(mini16, "evaluate_family", evaluated)
    out = tmp_path / "scores.json"
    out.write_text("a user's file\n")
    assert main(["eval", "--family", family, "--json", str(out)]) != 0
    assert "exists; refusing to overwrite it" in capsys.readouterr().err
    assert out.read_text() == "a user's file\n"


def test_publish_keeps_the_training_when_out_was_filled_meanwhile(tmp_path):
    from latentclip.miniworld.train import fresh_training_dir, publish
    out, tmp = fresh_training_dir(tmp_path / "out")
    (tmp / "model.safetensors").write_bytes(b"trained")
    out.mkdir()
    (out / "theirs.txt").write_text("written during training")
    with pytest.raises(FileExistsError, match="finished training is in"):
        publish(tmp, out, 0.0)
    assert (tmp / "model.safetensors").read_bytes() == b"trained" and (out / "theirs.txt").exists()
