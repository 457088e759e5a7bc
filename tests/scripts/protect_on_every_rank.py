"""Protect a tiny model under torchrun (`run_sophon` / `run_ntp` / `run_sophon_diffusion`); each rank writes its
final parameters."""

import sys

import torch
from safetensors.torch import save_file

from hf_ntl.evaluation import leave_process_group
from hf_ntl.protect import run_ntp, run_sophon, run_sophon_diffusion
from hf_ntl.trainers import (
    NTPConfig,
    NTPTrainer,
    SophonConfig,
    SophonDiffusionConfig,
    SophonDiffusionTrainer,
    SophonTrainer,
)

method, source_model, out_dir = sys.argv[1:4]
common = {
    "model_name_or_path": source_model,
    "output_dir": f"{out_dir}/{method}",
    "report_to": "none",
    "disable_tqdm": True,
    "use_cpu": True,
    "source_dataset": "uci-digits",
    "target_dataset": "textured-shapes",
    "source_fraction": 0.05,
    "target_fraction": 0.01,
    "per_device_train_batch_size": 8,
}
if method == "sophon":
    trainer_class, run = SophonTrainer, run_sophon
    config = SophonConfig(
        **common,
        iterations=3,
        guard_every=2,
        inner_steps=2,
        attacker_horizon=4,  # persistent attackers, each rank its own
        environments=1,
        inner_batch_sizes=[12, 20],
        query_size=6,
        guard_samples=40,
        guard_threshold=0.0,
    )
elif method == "sophon-diffusion":
    # Mechanics only: the real scans of uci-digits at 8x8 are quick to make on every rank.
    trainer_class, run = SophonDiffusionTrainer, run_sophon_diffusion
    common["target_dataset"] = "uci-digits"
    config = SophonDiffusionConfig(
        **common, iterations=3, guard_every=2, inner_steps=2, environments=1, inner_batch_sizes=[10], query_size=4,
        guard_samples=40,
    )  # fmt: skip
else:
    trainer_class, run = NTPTrainer, run_ntp
    config = NTPConfig(**common, admm_rounds=2, steps_per_round=2, retrain_steps=1, probe_steps=5)

original_train = trainer_class.train


def train_and_record(self, *args, **kwargs):
    output = original_train(self, *args, **kwargs)
    tensors = {name: p.detach().clone() for name, p in self.model.named_parameters()}
    tensors["world_size"] = torch.tensor(self.accelerator.num_processes)
    if method.startswith("sophon"):
        tensors["first_episode"] = torch.randperm(len(self.restricted), generator=self._generator(0))[:10]
    save_file(tensors, f"{out_dir}/rank{self.args.process_index}.safetensors")
    return output


trainer_class.train = train_and_record
run(config)
leave_process_group()
