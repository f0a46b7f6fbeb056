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


def test_hf_and_checkpoint_weights_give_the_same_results(tmp_path):
    """--hf DIR (a Hugging Face export) evaluates to exactly the numbers of the parameters checkpoint."""
    import json

    import jax
    import numpy as np
    from PIL import Image

    from geoalign_jax.convert import hf
    from geoalign_jax.models import clip
    from geoalign_jax.params_checkpoint import save_params

    rng = np.random.default_rng(0)
    data = tmp_path / "scenes"
    for class_name, colour in (("Forest", (20, 120, 30)), ("Desert", (220, 190, 120)), ("River", (30, 60, 200))):
        (data / class_name).mkdir(parents=True)
        for i in range(3):
            pixels = np.clip(np.array(colour) + rng.integers(-30, 30, (48, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(data / class_name / f"{i}.png")
    config = clip.get_model_config("tiny")
    params = clip.init_params(config, jax.random.key(7))
    checkpoint = save_params(tmp_path / "ckpt", config, params)
    hf.export_hf(config, params, tmp_path / "hf")

    results = {}
    for option, path in (("--checkpoint", checkpoint), ("--hf", tmp_path / "hf")):
        out = tmp_path / option.strip("-")
        assert main([option, str(path), "--tasks", f"zeroshot:scenes={data}", "--out", str(out), "--no_progress",
                     "--no_plots"]) == 0
        results[option] = json.loads((out / "results.json").read_text())["metrics"]
    assert results["--hf"] == results["--checkpoint"]
    assert results["--hf"]["zeroshot/scenes/num_samples"] == 9  # every image scored, not an empty comparison


def test_dashed_flags_are_primary_and_underscore_spellings_still_parse():
    """Every CLI uses dashed flags (issue 10 §4); the older underscore spellings stay as aliases."""
    from geoalign_jax.eval.__main__ import build_parser

    parser = build_parser()
    common = ["--tasks", "zeroshot:aid=x", "--out", "o"]
    dashed = parser.parse_args(["--open-clip", "w", "--quick-gelu", "true", "--batch-size", "8", "--num-threads", "3",
                                "--no-progress", "--no-plots", "--skip-bad-records", *common])
    underscored = parser.parse_args(["--open_clip", "w", "--quick_gelu", "true", "--batch_size", "8", "--num_threads",
                                     "3", "--no_progress", "--no_plots", "--skip_bad_records", *common])
    assert vars(dashed) == vars(underscored)
    assert (dashed.open_clip, dashed.quick_gelu, dashed.batch_size, dashed.num_threads) == ("w", "true", 8, 3)
    assert dashed.no_progress and dashed.no_plots and dashed.skip_bad_records
    usage = parser.format_usage()
    for option in parser._actions:
        long_options = [o for o in option.option_strings if o.startswith("--")]
        if long_options:
            assert "_" not in long_options[0], f"primary spelling {long_options[0]} is not dashed"
            assert long_options[0] in usage or option.help == "show this help message and exit"
