"""The evaluate CLI turns unreadable weights into a one-line error and exit status 2, not a traceback."""
from __future__ import annotations

from geoalign_jax.evaluate import main


def test_checkpoint_that_is_not_one_exits_2(tmp_path, capsys):
    data = tmp_path / "aid"
    (data / "Forest").mkdir(parents=True)
    not_a_checkpoint = tmp_path / "empty"
    not_a_checkpoint.mkdir()
    code = main(["--checkpoint", str(not_a_checkpoint), "--tasks", f"zeroshot:aid={data}", "--out", str(tmp_path / "o"),
                 "--no_progress", "--no_plots"])
    assert code == 2
    err = capsys.readouterr().err
    assert "error: cannot load the weights" in err and "not a geoalign-jax parameters checkpoint" in err
