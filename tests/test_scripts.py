"""`scripts/`: accelerate configs load, example configs parse, the launcher runs under `accelerate launch`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from hf_ntl.attacks import load_suite
from hf_ntl.cli import parse
from hf_ntl.data import ImagePreprocessor
from hf_ntl.models import build_tiny_classifier
from hf_ntl.source import SourceConfig
from hf_ntl.source_diffusion import DiffusionSourceConfig
from hf_ntl.trainers import NTPConfig, SophonConfig, SophonDiffusionConfig

SCRIPTS = Path(__file__).parents[1] / "scripts"
CONFIG_CLASSES = {
    "ntp": NTPConfig,
    "sophon": SophonConfig,
    "source": SourceConfig,
    "ddpm": DiffusionSourceConfig,
    "sophon-diffusion": SophonDiffusionConfig,
}


@pytest.mark.parametrize("path", sorted((SCRIPTS / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    config = load_config_from_file(str(path))
    assert config.num_processes >= 1 and config.compute_environment.value == "LOCAL_MACHINE"


@pytest.mark.parametrize("path", sorted((SCRIPTS / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_parse(path, tmp_path):
    kind = path.name.split("_")[0]
    if kind == "attacks":
        assert load_suite(str(path))
        return
    # bf16 needs a GPU; on this machine the rest of the Hub configs must still parse and validate.
    (config,) = parse([CONFIG_CLASSES[kind]], ["--config", str(path), "--bf16", "false"], "test")
    assert config.output_dir.startswith("runs/")


def test_launcher_runs_a_stage_under_accelerate_launch(tmp_path, domain_cache):
    model_dir = tmp_path / "model"
    build_tiny_classifier("tiny-resnet", 10).save_pretrained(model_dir)
    ImagePreprocessor().save_pretrained(model_dir)
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    command = [*launch, "--config_file", str(SCRIPTS / "accelerate" / "cpu.yaml")]
    command += [str(SCRIPTS / "launch.py"), "evaluate", "--model_name_or_path", str(model_dir), "--suite", "quick"]
    command += ["--steps", "2", "--counts", "5", "10", "--seeds", "0", "--output_dir", str(tmp_path / "audit")]
    env = {**os.environ, "HF_NTL_CACHE": str(domain_cache)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "worst case" in done.stdout
    assert len(json.loads((tmp_path / "audit" / "report.json").read_text())["points"]) == 3 * 2 * 2
