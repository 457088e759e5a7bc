"""Run a small evaluation under torchrun; each rank writes what it ran and what it got back."""

import json
import sys

import hf_ntl.evaluation as evaluation

model_dir, out_dir = sys.argv[1], sys.argv[2]
executed = []
original_run = evaluation.finetuned_accuracies


def counting_run(model, train, splits, spec, seed, mixed_precision="no"):
    executed.append((spec.name, seed, len(train)))
    return original_run(model, train, splits, spec, seed, mixed_precision)


evaluation.finetuned_accuracies = counting_run
args = evaluation.EvaluateArguments(
    model_name_or_path=model_dir, target_dataset="uci-digits", suite="quick", steps=2, counts=[5, 10], seeds=[0, 1]
)
report = evaluation.run_evaluation(args, progress=False)
rank = evaluation.process_state().process_index
with open(f"{out_dir}/rank{rank}.json", "w") as handle:
    json.dump({"executed": executed, "points": report["points"], "slc_auc": report["slc_auc"]}, handle)
evaluation.leave_process_group()
