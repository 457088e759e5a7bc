"""Regenerate `model_cards/`: the reference runs on the embedded default, each audited with the full default suite.

    make model-cards          # or: python scripts/reference_cards.py --runs runs/reference

Fits the tiny ResNet on `font-digits`, protects it against `uci-digits` with NTP and with SOPHON
(default settings), attacks each and the unprotected original with the default suite (n = 10,
50, 200; seeds 0, 1, 2) and writes each card and plot to `model_cards/<name>/`. Finished stages
in `--runs` are reused, so an interrupted regeneration picks up where it stopped; a stage of other
settings (a default changed since) is rerun and replaces it. About 10 minutes on 2 CPU cores
once the source model is fitted (9.8 measured), most of it the two audits.
"""

import argparse
import shutil
from pathlib import Path

from hf_ntl.artifacts import finished_run, holds_other_run, run_identity
from hf_ntl.cards import PLOT, write_card
from hf_ntl.evaluation import EvaluateArguments, run_evaluation
from hf_ntl.protect import run_ntp, run_sophon
from hf_ntl.source import MODEL_SUBDIR, SourceConfig, run_source
from hf_ntl.trainers import NTPConfig, SophonConfig

SOURCE, TARGET = "font-digits", "uci-digits"
PROTECTIONS = {"ntp": (NTPConfig, run_ntp), "sophon": (SophonConfig, run_sophon)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/reference", help="Where the runs go (finished stages are reused).")
    parser.add_argument("--cards", default="model_cards", help="Where the cards go.")
    args = parser.parse_args()
    runs, cards = Path(args.runs), Path(args.cards)
    # A finished stage is reused only when it is exactly the run asked for (its recorded identity).
    # A stage of other settings (a default changed since) is rerun and replaces it.
    source_config = SourceConfig(output_dir=str(runs / "source"), dataset_name=SOURCE, report_to="none")
    identity = run_identity("source", source_config)
    if not finished_run(source_config.output_dir, identity):
        source_config.overwrite = holds_other_run(source_config.output_dir, identity)
        run_source(source_config)
    source_model = runs / "source" / MODEL_SUBDIR
    for method, (config_class, run) in PROTECTIONS.items():
        config = config_class(
            output_dir=str(runs / method),
            model_name_or_path=str(source_model),
            source_dataset=SOURCE,
            target_dataset=TARGET,
            report_to="none",
        )
        identity = run_identity("protect", config, method)
        if not finished_run(config.output_dir, identity):
            config.overwrite = holds_other_run(config.output_dir, identity)
            run(config)
        model = runs / method / MODEL_SUBDIR
        audit = runs / "audit" / method
        audit_args = EvaluateArguments(
            model_name_or_path=str(model),
            original_model_name_or_path=str(source_model),
            target_dataset=TARGET,
            output_dir=str(audit),
        )
        identity = run_identity("evaluate", audit_args)
        if not finished_run(audit, identity, finished="report.json"):
            audit_args.overwrite = holds_other_run(audit, identity)
            run_evaluation(audit_args)
        name = f"tiny-resnet-{SOURCE}-{method}-{TARGET}"
        write_card(model, audit, model_name=name)
        folder = cards / name
        folder.mkdir(parents=True, exist_ok=True)
        for file in ("README.md", PLOT):
            shutil.copyfile(model / file, folder / file)
        print(f"{folder / 'README.md'}")


if __name__ == "__main__":
    main()
