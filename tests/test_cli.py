import json
import shutil
import subprocess
import sys

import pytest
from huggingface_hub import ModelCard

from hf_ntl.artifacts import OutputDirError, read_record
from hf_ntl.cli import COMMANDS, DemoArguments, main, parse
from hf_ntl.errors import InputError
from hf_ntl.evaluation import EvaluateArguments
from hf_ntl.source import SourceConfig


def test_top_level_help_lists_every_command(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--config" in capsys.readouterr().out


def test_console_script_is_installed_and_help_answers_without_loading_the_libraries():
    done = subprocess.run([sys.executable, "-m", "hf_ntl.cli", "--help"], capture_output=True, text=True, check=True)
    assert "fit-source" in done.stdout
    # Commands import torch, transformers and diffusers when they run; `--help` needs none of them.
    check = "import sys; from hf_ntl.cli import main; main(['--help']); "
    check += "print(sorted({'torch', 'diffusers'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_yaml_config_with_command_line_overrides(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model_name_or_path: some/model\ncounts: [5, 20]\nsuite: quick\nsteps: 7\n")
    (args,) = parse([EvaluateArguments], ["--config", str(config), "--steps", "9"], "test")
    assert args.model_name_or_path == "some/model" and args.counts == [5, 20]
    assert args.suite == "quick" and args.steps == 9


def test_training_arguments_come_from_yaml_too(tmp_path):
    config = tmp_path / "source.yaml"
    config.write_text("dataset_name: uci-digits\nnum_train_epochs: 2\nreport_to: none\naugment: false\n")
    (args,) = parse([SourceConfig], ["--config", str(config), "--output_dir", str(tmp_path / "out")], "test")
    assert args.dataset_name == "uci-digits" and args.num_train_epochs == 2 and args.augment is False


def test_unknown_keys_and_missing_files_are_input_errors(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model_name_or_path: m\nsuit: quick\n")
    with pytest.raises(InputError, match="unknown options: --suit quick"):
        parse([EvaluateArguments], ["--config", str(config)], "test")
    with pytest.raises(InputError, match="does not exist"):
        parse([DemoArguments], ["--config", str(tmp_path / "missing.yaml")], "test")


TINY_NTP = "admm_rounds: 1\nsteps_per_round: 4\nretrain_steps: 2\nprobe_steps: 10\nper_device_train_batch_size: 16\n"
TINY_SOPHON = (
    "iterations: 2\nguard_every: 1\ninner_steps: 1\nenvironments: 1\ninner_batch_sizes: [10]\nquery_size: 4\n"
    "guard_samples: 8\nguard_threshold: 0.0\nper_device_train_batch_size: 8\n"
)


def test_stage_commands_chain_through_their_folders_and_refuse_to_mix_runs(tmp_path, capsys):
    source, ntp, audit = tmp_path / "source", tmp_path / "ntp", tmp_path / "audit"
    fit = ["fit-source", "--output_dir", str(source), "--dataset_name", "uci-digits", "--num_train_epochs", "1"]
    fit += ["--report_to", "none", "--disable_tqdm", "true"]
    main(fit)
    (tmp_path / "ntp.yaml").write_text(TINY_NTP + "target_dataset: textured-shapes\nsource_dataset: uci-digits\n")
    protect = ["protect-ntp", "--config", str(tmp_path / "ntp.yaml"), "--model_name_or_path", str(source / "model")]
    protect += ["--output_dir", str(ntp), "--report_to", "none", "--disable_tqdm", "true", "--sparsity", "0.5"]
    main(protect)
    assert list(ntp.glob("checkpoint-*")) and (ntp / "model" / "model.safetensors").exists()
    evaluate = ["evaluate", "--model_name_or_path", str(ntp / "model"), "--target_dataset", "textured-shapes"]
    evaluate += ["--original_model_name_or_path", str(source / "model"), "--suite", "quick", "--steps", "3"]
    evaluate += ["--counts", "10", "20", "--seeds", "0", "--output_dir", str(audit)]
    main(evaluate)
    main(["card", "--model_dir", str(ntp / "model"), "--report_dir", str(audit), "--model_name", "me/tiny-ntp"])
    printed = capsys.readouterr().out
    assert "sparsity 0.5000" in printed and "worst case" in printed and "model card:" in printed
    card = ModelCard.load(ntp / "model" / "README.md")
    assert card.data.model_name == "me/tiny-ntp" and (ntp / "model" / "learning_curves.png").stat().st_size > 1000
    assert {r.metric_name for r in card.data.eval_results} >= {"Sparsity of the prunable weights"}

    # Each stage refuses a folder holding a finished result, or checkpoints of another run.
    with pytest.raises(OutputDirError, match="already holds a finished result"):
        main([*fit, "--debug"])
    with pytest.raises(OutputDirError, match="report.json"):
        main([*evaluate, "--debug"])
    shutil.rmtree(ntp / "model")  # an interrupted run: checkpoints, no model
    with pytest.raises(OutputDirError, match="another run \\(differing in sparsity\\)"):
        main([*protect[:-1], "0.6", "--debug"])
    assert list(ntp.glob("checkpoint-*"))  # refused without touching anything
    main([*protect[:-1], "0.6", "--overwrite"])
    assert read_record(ntp / "model")["config"]["sparsity"] == 0.6


def test_demo_end_to_end_on_a_tiny_setup(tmp_path, capsys):
    out = tmp_path / "demo"
    (tmp_path / "ntp.yaml").write_text(TINY_NTP)
    argv = ["--output_dir", str(out), "--source_epochs", "1", "--source_samples", "500", "--suite", "quick"]
    argv += ["--counts", "10", "20", "--seeds", "0", "--protect_config", str(tmp_path / "ntp.yaml")]
    main(["demo", *argv])
    captured = capsys.readouterr()
    printed = captured.out
    assert "[4/4] model card" in printed and "worst case" in printed and "lora-r4" in printed
    # Quiet: one progress display per stage, no Trainer dictionaries; the summary table comes last.
    assert "{'" not in captured.out + captured.err and "eval_runtime" not in captured.out + captured.err
    assert all(stage in captured.err for stage in ("source fit:", "NTP:", "audit:"))
    assert printed.rstrip().splitlines()[-1].split()[0] == "20"  # the last row of the accuracy table (n = 20)
    assert (out / "source" / "model" / "model.safetensors").exists()
    assert read_record(out / "ntp" / "model")["config"]["steps_per_round"] == 4
    report = json.loads((out / "audit-ntp" / "report.json").read_text())
    assert [spec["name"] for spec in report["suite"]] == ["full", "head-only", "lora-r4", "full-masked"]
    assert len(report["points"]) == 4 * 3 * 2  # attacks x (model, original, scratch) x counts
    assert set(report["zero_shot_accuracy"]) == {"model", "original"}
    assert report["test_overlap"]["total"] == 0 and report["test_overlap"]["unrecorded"]["model"] == []
    assert (out / "audit-ntp" / "learning_curves.png").stat().st_size > 1000
    card = ModelCard.load(out / "ntp" / "model" / "README.md")
    assert any("masked" in r.metric_name for r in card.data.eval_results)
    assert "**Leakage check**: the 4 sample sets" in card.text  # model: 3 (fit, protection x 2), original: 1
    # A second run reuses every finished stage.
    main(["demo", *argv])
    printed = capsys.readouterr().out
    assert "reusing the source model" in printed and "reusing the protected model" in printed
    assert "reusing the audit" in printed

    # SOPHON after NTP in the same folder (as the README suggests): the source model is reused, the audit is
    # SOPHON's own, and so is the card.
    (tmp_path / "sophon.yaml").write_text(TINY_SOPHON)
    sophon = [*argv[:-1], str(tmp_path / "sophon.yaml"), "--method", "sophon"]
    main(["demo", *sophon])
    printed = capsys.readouterr().out
    assert "reusing the source model" in printed and "reusing the audit" not in printed
    report = json.loads((out / "audit-sophon" / "report.json").read_text())
    assert report["model"] == str(out / "sophon" / "model") and report["source"]["method"] == "sophon"
    assert "sophon" in ModelCard.load(out / "sophon" / "model" / "README.md").data.tags

    # A stage asked for with other settings is never reused: its folder check refuses it instead.
    (tmp_path / "ntp.yaml").write_text(TINY_NTP.replace("steps_per_round: 4", "steps_per_round: 5"))
    with pytest.raises(OutputDirError, match="already holds a finished result"):
        main(["demo", *argv, "--debug"])
    assert "reusing the protected model" not in capsys.readouterr().out
    assert read_record(out / "ntp" / "model")["config"]["steps_per_round"] == 4
