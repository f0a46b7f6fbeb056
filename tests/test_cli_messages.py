"""What the CLIs print when something goes wrong (README "What a run survives"): evaluate and convert show
their INFO lines ("reading checkpoint step N of ...": which step of a workdir they read) and leave out orbax's
harmless "Metadata file does not exist", although importing orbax has already configured logging at WARNING
through absl (geoalign_jax/cli_logging.py); a failed async save is one line per library error and a full disk
names the file; evaluate / convert / prepare fail in one line; a refused resume names only the refused fields."""
from __future__ import annotations

import os
import subprocess
import sys

import train_fixtures

_CHILD = """
import logging
import geoalign_jax.convert.__main__  # imports orbax: absl calls logging.basicConfig() at WARNING
assert logging.getLogger().handlers, "orbax no longer configures logging on import: simplify cli_logging.setup"
from geoalign_jax import cli_logging
cli_logging.setup()
logging.getLogger("geoalign_jax.params_checkpoint").info("reading checkpoint step 20 of /w/checkpoints")
logging.getLogger("absl").warning("Metadata file does not exist: /w/checkpoints/20/params/_CHECKPOINT_METADATA")
logging.getLogger("absl").info("orbax writes a file")
logging.getLogger("absl").warning("a real orbax warning")
"""


def test_cli_logging_shows_info_once_and_leaves_out_the_library_noise():
    env = {**os.environ, "PYTHONPATH": str(train_fixtures.REPO_ROOT)}
    child = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=300,
                           cwd=train_fixtures.REPO_ROOT)
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stderr.splitlines() == ["INFO geoalign_jax.params_checkpoint: reading checkpoint step 20 of /w/checkpoints",
                                         "WARNING absl: a real orbax warning"], child.stderr


def test_a_failed_async_save_is_one_line_per_library_error_and_the_full_disk_line_names_the_file(tmp_path, capsys):
    """orbax logs a failed save's traceback from each background thread (826 lines for a demo run on a full
    tmpfs): without --debug each such record is one line; the CLI's last line names the file tensorstore could
    not write (its message quotes the path) and the newest complete step."""
    import logging

    from geoalign_jax import cli_logging
    from geoalign_jax.train import cli_errors

    message = ('RESOURCE_EXHAUSTED: Error writing "text.ln_final.bias/0" in OCDBT database at local file '
               '"/w/checkpoints/30.orbax-checkpoint-tmp/params/ocdbt.process_0/": Failed writing: '
               '"/w/checkpoints/30.orbax-checkpoint-tmp/params/ocdbt.process_0/d/a16b": Failed to write 659456 '
               'bytes to file 7: No space left on device [source locations=\'tensorstore/kvstore/file/...\']')
    try:
        raise ValueError(message)
    except ValueError:
        record = logging.makeLogRecord({"name": "absl", "levelno": logging.ERROR, "msg": "Save failed:\n%s",
                                        "args": ("thread save_finalize",), "exc_info": sys.exc_info()})
    kept = logging.makeLogRecord({"name": "absl", "msg": "Save failed:\n%s", "args": ("x",)})
    try:
        cli_logging.quiet_library_logs(keep_tracebacks=False)
        assert all(f.filter(record) for f in logging.getLogger("absl").filters)
        assert (record.getMessage(), record.exc_info) == ("Save failed: thread save_finalize", None)
        cli_logging.quiet_library_logs(keep_tracebacks=True)  # --debug: the record as the library wrote it
        assert len(logging.getLogger("absl").filters) == 1 and logging.getLogger("absl").filters[0].filter(kept)
        assert kept.getMessage() == "Save failed:\nx"
    finally:
        cli_logging.quiet_library_logs()
    (tmp_path / "checkpoints" / "20").mkdir(parents=True)
    assert cli_errors.report(ValueError(message), tmp_path, debug=False) == 1
    assert capsys.readouterr().err == (
        "error: no space left on device writing /w/checkpoints/30.orbax-checkpoint-tmp/params/ocdbt.process_0/d/a16b;"
        f" the newest complete checkpoint is step 20 in {tmp_path}/checkpoints (the same command resumes from it once"
        " there is space) (the traceback: --debug or GEOALIGN_DEBUG=1)\n")


def test_evaluate_convert_prepare_fail_in_one_line_unless_geoalign_debug(monkeypatch, capsys):
    """Their `__main__` runs main through error_text.run_main: an unexpected error (here an --out that cannot
    be created, which evaluate printed as a 22-line traceback) is one line with exit status 1."""
    from geoalign_jax.error_text import run_main

    def main() -> int:
        raise FileNotFoundError(2, "No such file or directory", "/proc/nope")

    monkeypatch.delenv("GEOALIGN_DEBUG", raising=False)
    assert run_main(main) == 1
    assert capsys.readouterr().err == ("error: FileNotFoundError: [Errno 2] No such file or directory: '/proc/nope' "
                                       "(the traceback: GEOALIGN_DEBUG=1)\n")
    assert run_main(lambda: 2) == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("GEOALIGN_DEBUG", "1")
    assert run_main(main) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and err.endswith("'/proc/nope'\n")
    for cli in ("evaluate.py", "eval/__main__.py", "convert/__main__.py", "prepare.py"):
        source = (train_fixtures.REPO_ROOT / "geoalign_jax" / cli).read_text()
        assert 'if __name__ == "__main__":\n    sys.exit(run_main(main))' in source, cli


def test_a_refused_resume_names_only_the_data_order_fields_with_both_values(tmp_path):
    """Resuming with another data.batch_size and another train.num_steps: the refusal names the field that is
    refused, with both values, not the allowed change beside it (it listed every changed field before)."""
    import json

    import pytest

    from geoalign_jax.train import experiment

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"data": {"batch_size": 8, "seed": 0}, "train": {"num_steps": 30}}))
    with pytest.raises(ValueError) as refused:
        experiment.compare_resumed_config(path, {"data": {"batch_size": 4, "seed": 0}, "train": {"num_steps": 40}})
    assert str(refused.value).startswith(f"the data order changed since the checkpoints in {tmp_path} were written "
                                         "(data.batch_size: 8 -> 4); ")
    experiment.compare_resumed_config(path, {"data": {"batch_size": 8, "seed": 0}, "train": {"num_steps": 40}})


def test_evaluate_refuses_an_out_it_cannot_create_before_any_work(tmp_path, capsys):
    """An --out under a file (or on a read-only disk): one line, exit 2, before any weights or data are read
    (it failed with a traceback after the whole evaluation); a usable --out is not left behind by a refusal."""
    from geoalign_jax.eval.__main__ import main

    (tmp_path / "a_file").write_text("x")
    code = main(["--model", "tiny", "--tasks", f"zeroshot:x={tmp_path}", "--out", str(tmp_path / "a_file" / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: --out {tmp_path}/a_file/out: cannot create it (") and err.count("\n") == 1
    # a creatable --out passes the check and is removed again: the refusal of the (empty) task after it leaves
    # nothing behind
    (tmp_path / "empty").mkdir()
    code = main(["--model", "tiny", "--tasks", f"zeroshot:x={tmp_path / 'empty'}", "--out", str(tmp_path / "new" / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "--out" not in err and not (tmp_path / "new").exists(), err


def test_a_recipe_without_an_argument_refuses_one_instead_of_ignoring_it():
    import importlib

    import pytest

    for name in ("dgtrs", "geoalignclip", "clip_baseline"):
        recipe = importlib.import_module(f"configs.{name}")
        with pytest.raises(ValueError, match=r"this recipe takes no argument after ':' \(got 'zz9'\)"):
            recipe.get_config("zz9")
        assert recipe.get_config().model.name and recipe.get_config("").model.name


def test_a_damaged_model_config_is_named(tmp_path):
    """convert export / evaluate --checkpoint on a workdir whose model_config.json is cut said only
    "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"."""
    import pytest

    from geoalign_jax.params_checkpoint import read_model_config

    (tmp_path / "params").mkdir()  # a parameters checkpoint; a workdir's checkpoints/model_config.json alike
    (tmp_path / "model_config.json").write_text("{bad")
    with pytest.raises(ValueError, match=rf"^{tmp_path}/model_config.json: not a readable JSON file \("):
        read_model_config(tmp_path)
