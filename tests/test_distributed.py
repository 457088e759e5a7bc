"""Two CPU processes under torchrun (accelerate launch --cpu starts only one here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from hf_ntl.data.transforms import ImagePreprocessor
from hf_ntl.evaluation import EvaluateArguments, run_evaluation
from hf_ntl.models import build_tiny_classifier

SCRIPTS = Path(__file__).parent / "scripts"


def without_time(points):
    return [{k: v for k, v in p.items() if k != "seconds"} for p in points]


def test_evaluation_runs_are_shared_between_ranks_and_gathered(tmp_path, domain_cache):
    model_dir = tmp_path / "model"
    build_tiny_classifier("tiny-resnet", 10).save_pretrained(model_dir)
    ImagePreprocessor().save_pretrained(model_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_NTL_CACHE": str(domain_cache)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*command, str(SCRIPTS / "evaluate_on_every_rank.py"), str(model_dir), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
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
