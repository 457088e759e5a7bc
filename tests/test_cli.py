import json
import subprocess
import sys

import pytest

from hf_ntl.cli import COMMANDS, DemoArguments, main, parse
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


def test_console_script_is_installed():
    done = subprocess.run([sys.executable, "-m", "hf_ntl.cli", "--help"], capture_output=True, text=True, check=True)
    assert "fit-source" in done.stdout


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


def test_unknown_keys_and_missing_files_are_errors(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("model_name_or_path: m\nsuit: quick\n")
    with pytest.raises(SystemExit):
        parse([EvaluateArguments], ["--config", str(config)], "test")
    assert "suit" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="does not exist"):
        parse([DemoArguments], ["--config", str(tmp_path / "missing.yaml")], "test")
    with pytest.raises(SystemExit, match="unknown command 'protekt'"):
        main(["protekt"])


def test_demo_end_to_end_on_a_tiny_setup(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["--output_dir", str(out), "--source_epochs", "1", "--source_samples", "500", "--suite", "quick"]
    argv += ["--counts", "10", "20", "--seeds", "0", "--target_datasets", "uci-digits"]
    main(["demo", *argv])
    printed = capsys.readouterr().out
    assert "worst case" in printed and "lora-r4" in printed
    assert (out / "source" / "model" / "model.safetensors").exists()
    report = json.loads((out / "evaluate" / "uci-digits" / "report.json").read_text())
    assert [spec["name"] for spec in report["suite"]] == ["full", "head-only", "lora-r4"]
    assert len(report["points"]) == 3 * 2 * 2  # attacks x (model, scratch) x counts
    assert 0.0 <= report["zero_shot_accuracy"]["model"] <= 1.0
    assert (out / "evaluate" / "uci-digits" / "learning_curves.png").stat().st_size > 1000
    # A second run reuses the finished source model instead of refitting it.
    main(["demo", *argv])
    assert "reusing the source model" in capsys.readouterr().out
