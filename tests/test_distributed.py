"""Two CPU processes under torchrun (accelerate launch --cpu starts only one here): evaluation and protection."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_ntl.artifacts import write_record
from hf_ntl.data.transforms import ImagePreprocessor
from hf_ntl.evaluation import EvaluateArguments, run_evaluation
from hf_ntl.models import build_tiny_classifier, build_tiny_ddpm, load_classifier, load_ddpm, save_ddpm

SCRIPTS = Path(__file__).parent / "scripts"


def torchrun(script: str, *args, cache: Path) -> None:
    """Run `tests/scripts/<script>` in two CPU processes (one thread each) and fail with its stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_NTL_CACHE": str(cache)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*command, str(SCRIPTS / script), *map(str, args)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]


def without_time(points):
    return [{k: v for k, v in p.items() if k != "seconds"} for p in points]


def test_evaluation_runs_are_shared_between_ranks_and_gathered(tmp_path, domain_cache):
    model_dir = tmp_path / "model"
    build_tiny_classifier("tiny-resnet", 10).save_pretrained(model_dir)
    ImagePreprocessor().save_pretrained(model_dir)
    torchrun("evaluate_on_every_rank.py", model_dir, tmp_path, cache=domain_cache)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # 3 attacks x (model, scratch) x 2 seeds x 2 counts = 24 runs, 12 on each rank, none twice.
    assert [len(r["executed"]) for r in ranks] == [12, 12]
    assert len(ranks[0]["points"]) == len(ranks[1]["points"]) == 24
    assert ranks[0]["points"] == ranks[1]["points"] and ranks[0]["slc_auc"] == ranks[1]["slc_auc"]

    single = run_evaluation(
        EvaluateArguments(
            model_name_or_path=str(model_dir),
            target_dataset="uci-digits",
            suite="quick",
            steps=2,
            counts=[5, 10],
            seeds=[0, 1],
        ),
        progress=False,
    )
    assert without_time(ranks[0]["points"]) == without_time(single["points"])


@pytest.mark.parametrize("method", ["sophon", "ntp", "sophon-diffusion"])
def test_two_process_ddp_protection_keeps_the_replicas_identical(tmp_path, domain_cache, method):
    source_model = tmp_path / "source"
    if method == "sophon-diffusion":
        save_ddpm(*build_tiny_ddpm(image_size=8), source_model)
        write_record(source_model, {"stage": "ddpm-source", "dataset": "uci-digits"})

        def load(path):
            return load_ddpm(path)[0]
    else:
        build_tiny_classifier("tiny-resnet", 10).save_pretrained(source_model)
        ImagePreprocessor().save_pretrained(source_model)
        load = load_classifier
    torchrun("protect_on_every_rank.py", method, source_model, tmp_path, cache=domain_cache)
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert ranks[0]["world_size"].item() == ranks[1]["world_size"].item() == 2
    if method != "ntp":  # each rank simulated different attackers...
        assert not torch.equal(ranks[0]["first_episode"], ranks[1]["first_episode"])
    # ... yet the replicas end identical (and trained), as the saved model is.
    initial = dict(load(source_model).named_parameters())
    saved = dict(load(tmp_path / method / "model").named_parameters())
    for name in initial:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.equal(ranks[0][name], saved[name]), name
    assert any(not torch.equal(ranks[0][name], tensor) for name, tensor in initial.items())
