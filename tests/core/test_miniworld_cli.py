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
