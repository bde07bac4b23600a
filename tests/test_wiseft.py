"""WiSE-FT: exact endpoints, in-place streamed mixing, architecture checks, the sweep's outputs,
2 ranks in lockstep, and (slow) the reduced end-to-end example on Fashion-MNIST.

The endpoint models are dsclip-tiny with two different random initialisations, saved as plain
open_clip state dicts: no pretrained CLIP weights can be downloaded here.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

from dsclip.config import load_config
from dsclip.model.build import build_model
from dsclip.model.config import ModelConfig
from dsclip.commands.wise_ft import main as wiseft_main
from dsclip.ensemble.config import WiseFtConfig, parse_alphas
from dsclip.ensemble.mixing import load_endpoints, mix_into
from dsclip.ensemble.wiseft import SweepRow, choose_alpha, run_wise_ft
from dsclip.errors import WiseFtError
from dsclip_testutils import REPO, free_port, read_metrics, subprocess_env

SMALL_EVAL = ["data.synthetic.eval_samples=48", "eval.batch_size=16",
              "eval.zeroshot=[{name: shapes, source: synthetic}, {name: shapes_top, source: synthetic}]",
              "eval.forgetting.general=[shapes_top]"]


def save_tiny(path: Path, seed: int, name: str = "dsclip-tiny", **kwargs) -> Path:
    """A plain open_clip state dict (0-dim logit scale), as open_clip itself saves it."""
    torch.manual_seed(seed)
    model = open_clip.create_model(name, **kwargs)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("endpoints")
    return save_tiny(folder / "zeroshot.bin", 0), save_tiny(folder / "finetuned.bin", 1)


def live_clip() -> nn.Module:
    return build_model(ModelConfig()).module.clip


# -- alphas and config ------------------------------------------------------------------------------
def test_alpha_ranges_include_the_stop_and_avoid_float_drift():
    assert parse_alphas("0:1:0.1") == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert parse_alphas("0,0.25,1") == [0.0, 0.25, 1.0]
    assert parse_alphas("0.5") == [0.5]
    for bad in ("0:1:0.3", "0:1:0", "1:0:0.1", "a", "0:1"):
        with pytest.raises(ValueError, match="start:stop:step"):
            parse_alphas(bad)


@pytest.mark.parametrize("cfg, message", [
    (WiseFtConfig(alphas=[]), "empty"),
    (WiseFtConfig(alphas=[0.0, 1.5]), "outside"),
    (WiseFtConfig(alphas=[0.0, 0.5, 0.5]), "twice"),
    (WiseFtConfig(alphas=[0.0, 1.0], save_alpha=0.5), "save_alpha"),
])
def test_config_rejects_unusable_alphas(cfg, message):
    with pytest.raises(ValueError, match=message):
        cfg.validate()


def test_default_choice_balances_task_and_general_and_prefers_zero_shot_on_ties():
    rows = [SweepRow(0.0, {}, 10.0, 90.0), SweepRow(0.5, {}, 50.0, 70.0), SweepRow(1.0, {}, 70.0, 20.0)]
    assert choose_alpha(rows, None).alpha == 0.5
    assert choose_alpha(rows, 1.0).alpha == 1.0
    tied = [SweepRow(1.0, {}, 60.0, 40.0), SweepRow(0.0, {}, 40.0, 60.0)]
    assert choose_alpha(tied, None).alpha == 0.0
    assert choose_alpha([SweepRow(0.0, {}, 10.0, None), SweepRow(1.0, {}, 70.0, None)], None).alpha == 1.0


# -- mixing -----------------------------------------------------------------------------------------
def test_endpoints_are_exact_and_mixing_happens_in_place(endpoints):
    zeroshot, finetuned = endpoints
    clip = live_clip()
    start, end = load_endpoints(clip, "dsclip-tiny", str(zeroshot), str(finetuned))
    storage = {k: v.data_ptr() for k, v in clip.state_dict().items()}
    for alpha, expected in ((0.0, torch.load(zeroshot)), (1.0, torch.load(finetuned))):
        mix_into(clip, start, end, alpha)
        mixed = clip.state_dict()
        assert sorted(mixed) == sorted(expected)
        unequal = [k for k in mixed if not torch.equal(mixed[k].reshape(expected[k].shape), expected[k])]
        assert not unequal, f"alpha={alpha} differs from its endpoint in {unequal[:5]}"
    mix_into(clip, start, end, 0.3)
    a, b = torch.load(zeroshot), torch.load(finetuned)
    for key, value in clip.state_dict().items():
        torch.testing.assert_close(value.reshape(a[key].shape), 0.7 * a[key] + 0.3 * b[key], rtol=1e-5, atol=1e-6)
    assert {k: v.data_ptr() for k, v in clip.state_dict().items()} == storage, "a new tensor per alpha"


def test_integer_buffers_come_from_the_nearer_endpoint_and_are_never_averaged():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    start = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    end = {k: torch.ones_like(v) * 8 for k, v in net.state_dict().items()}
    for alpha, count in ((0.0, 0), (0.3, 0), (0.5, 8), (1.0, 8)):
        mix_into(net, start, end, alpha)
        assert net.state_dict()["1.num_batches_tracked"].item() == count
        assert net.state_dict()["0.weight"].unique().tolist() == [pytest.approx(8 * alpha)]


def test_different_architectures_fail_with_a_listing_of_the_differences(tmp_path, endpoints):
    config = json.loads((REPO / "dsclip" / "model" / "configs" / "dsclip-tiny.json").read_text())
    config["embed_dim"], config["vision_cfg"]["layers"] = 32, 3
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "wiseft-other.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "configs")
    other = save_tiny(tmp_path / "other.bin", 2, name="wiseft-other")
    with pytest.raises(WiseFtError) as error:
        load_endpoints(live_clip(), "dsclip-tiny", str(endpoints[0]), str(other))
    message = str(error.value)
    assert "different architectures" in message and "\n" not in message
    assert "only in fine-tuned (visual.transformer.resblocks.2." in message
    assert "shape differences" in message and "text_projection: (64, 64) vs (64, 32)" in message


def test_a_fine_tune_at_a_larger_image_size_mixes_with_its_zero_shot_model(tmp_path, endpoints):
    bigger = save_tiny(tmp_path / "48px.bin", 3, force_image_size=48)
    clip = build_model(ModelConfig(image_size=48)).module.clip
    start, end = load_endpoints(clip, "dsclip-tiny", str(endpoints[0]), str(bigger))
    assert start["visual.positional_embedding"].shape == end["visual.positional_embedding"].shape == (37, 64)
    mix_into(clip, start, end, 1.0)
    assert torch.equal(clip.state_dict()["visual.positional_embedding"], torch.load(bigger)["visual.positional_embedding"])


# -- the command ------------------------------------------------------------------------------------
def test_command_writes_table_json_plot_and_the_chosen_weights_exactly(tmp_path, endpoints, capsys):
    zeroshot, finetuned = endpoints
    report = tmp_path / "report"
    args = ["--zeroshot", str(zeroshot), "--finetuned", str(finetuned), "--alphas", "0:1:0.5", "--save-alpha", "0",
            "--report-dir", str(report), "--out", str(tmp_path / "chosen.safetensors")]
    assert wiseft_main(args + [item for s in SMALL_EVAL for item in ("--set", s)]) == 0
    record = json.loads((report / "wise_ft.json").read_text())
    assert [row["alpha"] for row in record["rows"]] == [0.0, 0.5, 1.0]
    assert record["task_evals"] == ["shapes"] and record["general_evals"] == ["shapes_top"]
    assert record["chosen_alpha"] == 0.0
    for row in record["rows"]:
        assert row["task"] == row["metrics"]["eval/shapes/top1"]
        assert row["general"] == row["metrics"]["eval/shapes_top/top1"]
    table = (report / "wise_ft.md").read_text().splitlines()
    assert table[0].startswith("| alpha | shapes | shapes_top (general) | task | general |")
    assert len(table) == 5 and table[2].endswith("| saved |")
    assert (report / "wise_ft.png").stat().st_size > 10_000
    # The chosen weights are an open_clip model equal to the zero-shot input, tensor for tensor.
    model, _, _ = open_clip.create_model_and_transforms("dsclip-tiny", pretrained=str(tmp_path / "chosen.safetensors"))
    expected = torch.load(zeroshot)
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert json.loads((tmp_path / "chosen.json").read_text())["model_cfg"]["vision_cfg"]["image_size"] == 32
    assert "wise-ft alpha 0.5: shapes=" in capsys.readouterr().out


def test_command_refuses_a_save_alpha_it_does_not_evaluate(endpoints, capsys):
    args = ["--zeroshot", str(endpoints[0]), "--finetuned", str(endpoints[1]), "--alphas", "0,1", "--save-alpha",
            "0.5"]
    assert wiseft_main(args) == 2
    assert capsys.readouterr().err.strip() == (
        "dsclip: error: --save-alpha=0.5 is not one of --alphas [0.0, 1.0]: the saved weights must be ones that "
        "were evaluated")


def test_command_reports_different_architectures_in_one_line(tmp_path, endpoints, capsys):
    other = save_tiny(tmp_path / "small_vocab.bin", 4)
    state = torch.load(other)
    state["token_embedding.weight"] = state["token_embedding.weight"][:100]
    torch.save(state, other)
    assert wiseft_main(["--zeroshot", str(endpoints[0]), "--finetuned", str(other), "--alphas", "0,1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dsclip: error: zero-shot ") and "token_embedding.weight: (49408, 64) vs (100, 64)" in err
    assert len(err.splitlines()) == 1


# -- 2 ranks in lockstep ----------------------------------------------------------------------------
def sweep_on_rank(rank: int, port: int, zeroshot: str, finetuned: str, out_dir: str) -> None:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        run_wise_ft(WiseFtConfig(enabled=True, alphas=[0.0, 0.5, 1.0]), load_config(None, SMALL_EVAL),
                    zeroshot, finetuned, Path(out_dir))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_ranks_shard_the_evaluation_and_agree_with_one_process(tmp_path, endpoints):
    zeroshot, finetuned = (str(p) for p in endpoints)
    mp.spawn(sweep_on_rank, args=(free_port(), zeroshot, finetuned, str(tmp_path / "two")), nprocs=2)
    one = run_wise_ft(WiseFtConfig(enabled=True, alphas=[0.0, 0.5, 1.0]), load_config(None, SMALL_EVAL),
                      zeroshot, finetuned, tmp_path / "one")
    two = json.loads((tmp_path / "two" / "wise_ft.json").read_text())
    assert [row["metrics"] for row in two["rows"]] == [row.metrics for row in one.rows]
    assert torch.equal(load_file(str(tmp_path / "two" / "export" / "open_clip_model.safetensors"))["visual.proj"],
                       load_file(str(one.weights))["visual.proj"])


# -- the recipe section, run by the trainer at the end of training -----------------------------------
@pytest.mark.multiprocess
def test_recipe_section_sweeps_between_pretrained_and_the_fine_tuned_export(tmp_path, endpoints):
    overrides = SMALL_EVAL + [f"model.pretrained={endpoints[0]}", "train.max_steps=4", "optim.warmup_steps=1",
                              "data.batch_size=16", "logging.plots=false", f"output_dir={tmp_path}", "name=run",
                              "wise_ft.enabled=true", "wise_ft.alphas=[0.0, 1.0]"]
    result = subprocess.run([sys.executable, "-m", "dsclip.cli", "train"] + [a for o in overrides for a in ("--set", o)],
                            cwd=REPO, capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    evals = [r for r in read_metrics(tmp_path / "run") if "eval/shapes/top1" in r]
    rows = json.loads((tmp_path / "run" / "wise_ft" / "wise_ft.json").read_text())["rows"]
    assert rows[0]["metrics"]["eval/shapes/top1"] == evals[0]["eval/shapes/top1"]  # alpha 0: before training
    assert rows[1]["metrics"]["eval/shapes/top1"] == evals[-1]["eval/shapes/top1"]  # alpha 1: the fine-tuned model


# -- the docs/evaluation.md example, reduced --------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["wiseft_shapes.yaml", "wiseft_fashion.yaml"])
def test_example_recipes_validate_and_say_how_to_run_them(recipe):
    path = REPO / "launch" / "recipes" / recipe
    cfg = load_config(str(path))
    assert cfg.name == path.stem and cfg.model.name == "dsclip-tiny"
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert all(f"# {part}" in header for part in ("Use when:", "Sets:", "Run:"))
    assert f"--recipe launch/recipes/{recipe}" in header


def test_fine_tune_recipe_names_fashion_the_task_and_shapes_general():
    cfg = load_config(str(REPO / "launch" / "recipes" / "wiseft_fashion.yaml"))
    assert cfg.model.pretrained == "outputs/wiseft_shapes/export"
    assert [t.name for t in cfg.eval.zeroshot] == ["fashion", "shapes"] and cfg.eval.forgetting.general == ["shapes"]


@pytest.mark.slow
def test_reduced_example_improves_fashion_and_reproduces_the_fine_tune_evals_at_both_ends(tmp_path):
    result = subprocess.run([sys.executable, "bench/wiseft_example.py", "--quick", "--ranks", "1", "--alphas",
                             "0,0.5,1", "--out", str(tmp_path / "out"), "--results", str(tmp_path / "results")],
                            cwd=REPO, capture_output=True, text=True, timeout=900, env=subprocess_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "results" / "wiseft_example_quick.json").read_text())["sweep"]["rows"]
    evals = [r for r in read_metrics(tmp_path / "out" / "wiseft_fashion") if "eval/fashion/top1" in r]
    for row, run_eval in ((rows[0], evals[0]), (rows[-1], evals[-1])):  # before and after fine-tuning
        for key in ("eval/fashion/top1", "eval/shapes/top1"):
            assert row["metrics"][key] == pytest.approx(run_eval[key], abs=0.25), (row["alpha"], key)
    assert rows[-1]["task"] > rows[0]["task"] + 10, "the fine-tune did not learn Fashion-MNIST"
    assert (tmp_path / "results" / "wiseft_example_quick.png").is_file()
