"""`hf-ntl tune`: a tiny study end to end, resuming, two workers on one study, the floor, bad search spaces."""

import contextlib
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from datasets import DatasetDict
from huggingface_hub import ModelCard

import hf_ntl.tune as tune
from hf_ntl.artifacts import read_record
from hf_ntl.data import load_image_classification_dataset
from hf_ntl.data.fingerprint import image_hash, image_hashes
from hf_ntl.data.transforms import ImagePreprocessor
from hf_ntl.errors import InputError
from hf_ntl.source import SourceConfig, run_source
from hf_ntl.trainers import NTPConfig
from hf_ntl.tune import TuneArguments, load_search_space, run_tune

SOURCE = "uci-digits"
TINY_NTP = "admm_rounds: 1\nsteps_per_round: 4\nretrain_steps: 2\nprobe_steps: 10\nper_device_train_batch_size: 16\n"
TINY_SUITE = (
    "- {name: full, trainable: all, optimizer: adam, learning_rate: 1.0e-3, steps: 3}\n"
    "- {name: sgdm, trainable: all, optimizer: sgd-momentum, learning_rate: 1.0e-2, steps: 3}\n"
)
# Holds NTP's defaults (fisher_lambda 1, alpha 3), so the study's first trial is the defaults.
TINY_SPACE = "fisher_lambda: {choices: [1.0, 0.1]}\nalpha: {low: 1.5, high: 6.0, log: true}\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A source model fitted for four epochs, a small target data set folder, and the YAML files of a tiny study.

    The target is uci-digits' handwriting on textures, to which the source model transfers well: its test images are
    uci test scans the source fit never saw, but its train images (and so the study's validation images) are uci
    train scans it was fitted on, on new textures, so part of the original's head start (proxy worst case about
    +0.2 here) is memorised digits. That is what this test wants: a clear margin over the first trial (NTP's default
    lambda and alpha, tiny schedule; about 0.17 with NTP's former defaults), so that the study releases a model. On
    textured shapes both sat within 0.03 of scratch, and which one won changed with the CPU.
    """
    folder = tmp_path_factory.mktemp("tune")
    config = SourceConfig(output_dir=str(folder / "source"), dataset_name=SOURCE, num_train_epochs=4, report_to="none")
    run_source(config)
    textured = load_image_classification_dataset("textured-digits", image_size=32)
    target = DatasetDict(train=textured["train"].select(range(400)), test=textured["test"].select(range(100)))
    target.save_to_disk(str(folder / "target"))
    for name, text in (("ntp.yaml", TINY_NTP), ("suite.yaml", TINY_SUITE), ("space.yaml", TINY_SPACE)):
        (folder / name).write_text(text)
    return folder


def tiny_study(setup, output_dir, **overrides) -> TuneArguments:
    values = dict(
        model_name_or_path=str(setup / "source" / "model"),
        source_dataset=SOURCE,
        target_dataset=str(setup / "target"),
        trials=2,
        search_space=str(setup / "space.yaml"),
        protect_config=str(setup / "ntp.yaml"),
        max_source_drop=1.0,
        source_validation_samples=100,
        target_validation_samples=60,
        proxy_attacks=["full", "sgdm"],
        proxy_counts=[10, 20],
        suite=str(setup / "suite.yaml"),
        counts=[10, 20],
        seeds=[0],
        pruner="none",
        sampler_seed=0,
        output_dir=str(output_dir),
    )
    return TuneArguments(**(values | overrides))


def argv_of(args: TuneArguments) -> list[str]:
    argv = []
    for name, value in vars(args).items():
        if value is not None:
            argv += [f"--{name}", *map(str, value if isinstance(value, list) else [value])]
    return argv


@pytest.fixture(scope="module")
def resumed_study(setup):
    """A two-trial study interrupted in its second trial's audit, then run again to the end.

    Every image any stage turns into model inputs passes through `ImagePreprocessor`: the hashes of those seen
    before the final audit started, and after, are recorded; so is every protection run.
    """
    seen = {"trials": set(), "final": set()}
    phase = {"now": "trials"}
    protections, audits = [], []
    call, evaluation, proxy_audit = ImagePreprocessor.__call__, tune.run_evaluation, tune.Objective.proxy_audit
    config_class, protect = tune.PROTECTIONS["ntp"]

    def recording_call(self, images):
        seen[phase["now"]].update(image_hash(image) for image in images)
        return call(self, images)

    def final_evaluation(args, *rest, **kwargs):
        phase["now"] = "final"
        return evaluation(args, *rest, **kwargs)

    def counting_protect(config):
        protections.append(config.output_dir)
        return protect(config)

    def interrupted_second_audit(self, trial, folder):
        audits.append(folder)
        if len(audits) == 2:
            raise KeyboardInterrupt
        return proxy_audit(self, trial, folder)

    out = setup / "study"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ImagePreprocessor, "__call__", recording_call)
        patch.setattr(tune, "run_evaluation", final_evaluation)
        patch.setitem(tune.PROTECTIONS, "ntp", (config_class, counting_protect))
        patch.setattr(tune.Objective, "proxy_audit", interrupted_second_audit)
        with pytest.raises(KeyboardInterrupt):
            run_tune(tiny_study(setup, out))
        interrupted = {"protections": len(protections), "audits": len(audits)}
        patch.setattr(tune.Objective, "proxy_audit", proxy_audit)
        summary = run_tune(tiny_study(setup, out))
    return {"out": out, "summary": summary, "seen": seen, "protections": protections, "interrupted": interrupted}


def test_a_study_chooses_on_validation_and_reads_the_test_split_only_for_the_final_audit(setup, resumed_study):
    out, summary, seen = resumed_study["out"], resumed_study["summary"], resumed_study["seen"]
    tests = set(image_hashes(load_image_classification_dataset(str(setup / "target"))["test"]))
    tests |= set(image_hashes(load_image_classification_dataset(SOURCE, image_size=32)["test"]))
    assert seen["trials"] and not seen["trials"] & tests  # no test image before the final audit
    assert seen["final"] & tests  # the final audit did score on the test split (and the spy sees it)
    for role in ("source", "target"):  # the trials' data hold no test image either
        trial_data = load_image_classification_dataset(str(out / "data" / role))
        assert not (set(image_hashes(trial_data["train"])) | set(image_hashes(trial_data["test"]))) & tests

    assert summary["source_validation_trained_on"] == 100  # the setup's source was fitted on all of its split
    trials = [t for t in json.loads((out / "tuning.json").read_text())["trials"] if t["state"] == "complete"]
    assert trials[0]["defaults"] and trials[0]["params"] == {"fisher_lambda": 1.0, "alpha": 3.0}
    best = min(trials, key=lambda t: t["worst_case_slc_auc"])
    assert summary["best_trial"] == best["number"] and summary["params"] == best["params"]
    assert summary["validation"]["worst_case_slc_auc"] == best["worst_case_slc_auc"]
    # The chosen model is the best trial's, audited on the real target's test split against the original.
    assert summary["audit"] == str(out / best["folder"] / "audit")
    report = json.loads((out / best["folder"] / "audit" / "report.json").read_text())
    assert report["target"] == str(setup / "target") and report["target_test_samples"] == 100
    assert report["test_overlap"]["total"] == 0 and report["original"] == str(setup / "source" / "model")
    assert summary["test"]["worst_case_slc_auc"] == report["slc_auc"]["model"]["worst_case"]["slc_auc"]
    record = read_record(out / "model")
    assert record["config"]["fisher_lambda"] == best["params"]["fisher_lambda"]
    assert record["tuning"]["best_trial"] == best["number"] and record["tuning"]["finished_trials"] == 2
    # Its record gives the source accuracies of the test split, as the audit's figures are.
    assert record["dataset"] == SOURCE and record["source_accuracy_after"] == summary["test"]["source_accuracy"]
    card = ModelCard.load(out / "model" / "README.md")
    assert "How the settings were chosen" in card.text and "hf-ntl tune --method ntp" in card.text
    # The options every trial shared (the owner's --protect_config; NTP has no guard to set) are recorded.
    assert summary["fixed_options"]["admm_rounds"] == 1 and not summary["guard_at_floor"]
    assert "Fixed for every trial: `admm_rounds` 1;" in card.text and "`steps_per_round` 4." in card.text
    assert (out / "model" / "trials.png").stat().st_size > 1000
    assert not list((out / "trials").glob("*/checkpoint-*"))  # finished trials keep their model only
    # The unprotected original was audited with the same proxy; its figure is the bar the chosen trial cleared.
    original = json.loads((out / "proxy_original.json").read_text())
    assert original["model"] == str(setup / "source" / "model") and original["attacks"] == ["full", "sgdm"]
    assert summary["validation"]["worst_case_slc_auc_original"] == original["slc_auc"]["worst_case"]["slc_auc"]
    assert original["worst_case_by_attack"][-1] == original["slc_auc"]["worst_case"]["slc_auc"]


def test_tune_counts_the_source_validation_images_the_source_model_was_fitted_on(setup, tmp_path):
    args = tiny_study(setup, tmp_path / "study")  # 100 source validation images of uci-digits' train split
    validation = tune.trial_data(SOURCE, 100, 32)["test"]
    assert tune.trained_on_validation(args, validation, 32) == 100  # the setup's source fit took the whole split
    held_out = SourceConfig(
        output_dir=str(tmp_path / "held"), dataset_name=SOURCE, validation_samples=100, max_steps=2, report_to="none"
    )
    run_source(held_out)
    record = read_record(tmp_path / "held" / "model")
    train = load_image_classification_dataset(SOURCE, image_size=32)["train"]
    assert record["validation_samples"] == 100 and record["train_samples"] == len(train) - 100
    held = dataclasses.replace(args, model_name_or_path=str(tmp_path / "held" / "model"))
    assert tune.trained_on_validation(held, validation, 32) == 0
    # A larger validation split holds the smaller one: the 50 images beyond it were fitted on.
    wider = dataclasses.replace(held, source_validation_samples=150)
    assert tune.trained_on_validation(wider, tune.trial_data(SOURCE, 150, 32)["test"], 32) == 50


def test_a_study_whose_best_trial_does_not_beat_the_original_releases_nothing(setup, resumed_study, tmp_path):
    out = tmp_path / "study"
    shutil.copytree(resumed_study["out"], out)
    released = (out / "model" / "model.safetensors").read_bytes()
    # As if the original's proxy worst case were below every trial's (a study whose trials all failed to protect).
    original = json.loads((out / "proxy_original.json").read_text())
    best = resumed_study["summary"]["validation"]["worst_case_slc_auc"]
    original["slc_auc"]["worst_case"]["slc_auc"] = best - 0.01
    (out / "proxy_original.json").write_text(json.dumps(original))
    bar = re.escape(f"{best - 0.01:+.3f}")  # a plus sign is a regex quantifier
    with pytest.raises(InputError, match=f"No setting protected within the floor: .* {bar}"):
        run_tune(tiny_study(setup, out))
    assert (out / "model" / "model.safetensors").read_bytes() == released  # the earlier result is left whole


def test_a_trial_that_kept_the_original_weights_is_not_audited_and_not_released(setup, tmp_path):
    config_class, protect = tune.PROTECTIONS["ntp"]
    original = setup / "source" / "model" / "model.safetensors"

    def restored_protect(config):  # what a guard that restored the starting weights leaves
        record = protect(config)
        shutil.copyfile(original, Path(config.output_dir) / "model" / "model.safetensors")
        return record

    args = tiny_study(setup, tmp_path / "study", trials=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(tune.PROTECTIONS, "ntp", (config_class, restored_protect))
        with pytest.raises(InputError, match="No setting protected within the floor"):
            run_tune(args)
    study = optuna.load_study(study_name="hf-ntl-tune", storage=f"sqlite:///{tmp_path / 'study' / 'study.db'}")
    (trial,) = study.trials
    original_proxy = json.loads((tmp_path / "study" / "proxy_original.json").read_text())
    assert trial.user_attrs["unchanged"] and trial.value == original_proxy["slc_auc"]["worst_case"]["slc_auc"]
    # The pruner sees it as it would an audited trial: the original's running worst case, attack by attack.
    assert list(trial.intermediate_values.values()) == original_proxy["worst_case_by_attack"]
    assert not (tmp_path / "study" / "trials" / "0000" / "proxy_report.json").exists()  # no audit was run for it
    assert not (tmp_path / "study" / "model").exists()


def test_a_guard_is_set_to_the_floor_unless_the_owner_sets_it(setup, tmp_path):
    args = tiny_study(setup, tmp_path, method="sophon", max_source_drop=0.02, search_space=None, protect_config=None)
    space = load_search_space(tune.default_search_space("sophon"), tune.PROTECTIONS["sophon"][0])
    at_floor = {"guard_max_drop": 0.02, "guard_threshold": 0.0}
    assert (
        tune.guard_at_floor(args, space) == at_floor and tune.tune_identity(args, space, ["full"])["guard"] == at_floor
    )
    config = tune.Objective(args, space, ["full"], original_source=0.95).protection_config(tmp_path / "trial", {})
    assert (config.guard_max_drop, config.guard_threshold) == (0.02, 0.0)
    # The owner's fixed options, or the search space, decide instead; NTP has no guard.
    (tmp_path / "fixed.yaml").write_text("guard_threshold: 0.5\n")
    fixed = dataclasses.replace(args, protect_config=str(tmp_path / "fixed.yaml"))
    assert tune.guard_at_floor(fixed, space) == {}
    config = tune.Objective(fixed, space, ["full"], 0.95).protection_config(tmp_path, {})
    assert (config.guard_max_drop, config.guard_threshold) == (None, 0.5)
    assert tune.guard_at_floor(args, [*space, tune.Parameter("guard_max_drop", low=0.01, high=0.05)]) == {}
    assert tune.guard_at_floor(tiny_study(setup, tmp_path), []) == {}


def test_a_proxy_without_an_attack_for_the_unpruned_original_is_refused(setup, tmp_path):
    args = tiny_study(setup, tmp_path, suite="default", proxy_attacks=["full-masked"])
    with pytest.raises(InputError, match="no attack for an unpruned model"):
        tune.proxy_attacks(args)


def test_an_interrupted_study_resumes_with_its_finished_trials_kept(resumed_study):
    out, summary = resumed_study["out"], resumed_study["summary"]
    assert resumed_study["interrupted"] == {"protections": 2, "audits": 2}
    states = [t["state"] for t in summary["trials"]]
    # The first trial is kept; the interrupted trial's settings are tried again in its own folder, where its
    # protection had finished: nothing is protected again.
    assert states == ["complete", "fail", "complete"] and len(resumed_study["protections"]) == 2
    assert summary["trials"][2]["params"] == summary["trials"][1]["params"]
    assert summary["trials"][2]["folder"] == summary["trials"][1]["folder"] == "trials/0001"
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0000", "0001"]
    # The pruner sees the worst case after each proxy attack; the last one is the trial's value.
    study = optuna.load_study(study_name="hf-ntl-tune", storage=f"sqlite:///{out / 'study.db'}")
    first = study.trials[0]
    assert sorted(first.intermediate_values) == [0, 1] and first.intermediate_values[1] == first.value


def test_two_processes_share_one_study(setup, resumed_study, tmp_path):
    # Two workers, this process and another, extend a copy of the finished study (two trials done) to four.
    out = tmp_path / "study"
    shutil.copytree(resumed_study["out"], out)
    args = tiny_study(setup, out, trials=4, sampler_seed=None)
    command = [sys.executable, "-m", "hf_ntl.cli", "tune", *argv_of(args)]
    storage = f"sqlite:///{out / 'study.db'}"
    with (tmp_path / "other.log").open("w") as log:
        other = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        while other.poll() is None and len(optuna.load_study(study_name="hf-ntl-tune", storage=storage).trials) < 4:
            time.sleep(0.5)  # until the other worker has taken the next trial
        run_tune(args)
        assert other.wait(timeout=600) == 0, (tmp_path / "other.log").read_text()
    study = optuna.load_study(study_name="hf-ntl-tune", storage=storage)
    new = [t for t in study.trials[3:] if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(new) >= 2 and len({t.user_attrs["worker"] for t in new}) == 2  # both took a trial
    for trial in new:  # each in its own folder, with its own protected model
        assert read_record(out / "trials" / f"{trial.number:04d}" / "model")["config"]["alpha"] == trial.params["alpha"]
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = min(completed, key=lambda t: t.value)
    assert json.loads((out / "tuning.json").read_text())["best_trial"] == best.number
    assert read_record(out / "model")["config"]["alpha"] == best.params["alpha"]  # the released model is the best


def test_a_killed_worker_trial_is_taken_up_again_once_its_heartbeat_is_stale(setup, tmp_path, monkeypatch):
    # A worker killed (SIGKILL) in its first trial leaves it RUNNING with a heartbeat that stops.
    out = tmp_path / "study"
    args = tiny_study(setup, out, trials=1)
    storage = f"sqlite:///{out / 'study.db'}"
    worker = subprocess.Popen([sys.executable, "-m", "hf_ntl.cli", "tune", *argv_of(args)], stderr=subprocess.DEVNULL)
    running = []
    while worker.poll() is None and not running:
        time.sleep(0.5)
        # A trial's folder appears once the study is in the database: reading it sooner would race the worker's
        # creation of its tables (both would create them).
        if (out / "trials").exists():
            with contextlib.suppress(KeyError):
                study = optuna.load_study(study_name="hf-ntl-tune", storage=storage)
                running = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    worker.kill()
    worker.wait()
    assert running, "the worker finished before it could be killed in a trial"
    # The next worker to start, once the heartbeat is older than the grace period, fails it and tries its
    # settings again in the same folder.
    monkeypatch.setattr(tune, "GRACE", 1)
    time.sleep(2)
    # Whether this tiny protection then beats the original (the final audit's bar) is not under test here.
    with contextlib.suppress(InputError):
        run_tune(args)
    killed, retried = optuna.load_study(study_name="hf-ntl-tune", storage=storage).trials
    assert killed.state == optuna.trial.TrialState.FAIL and retried.state == optuna.trial.TrialState.COMPLETE
    assert retried.params == killed.params and retried.user_attrs["resumes"] == killed.number == 0
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0000"]  # the same folder, taken up again


def test_a_trial_below_the_source_floor_is_pruned_and_settings_may_not_change(setup, tmp_path, capsys):
    (tmp_path / "space.yaml").write_text("sparsity: {choices: [0.99]}\n")  # destroys a tiny model's accuracy
    args = tiny_study(setup, tmp_path / "study", trials=1, search_space=str(tmp_path / "space.yaml"))
    args.max_source_drop = 0.0
    with pytest.raises(InputError, match="No trial of 1 finished within"):
        run_tune(args)
    # NTP sets its sparsity from the model by default: no point of a space that searches it is the defaults.
    assert "no defaults trial: the defaults of sparsity (set from the model) are not points" in capsys.readouterr().out
    study = optuna.load_study(study_name="hf-ntl-tune", storage=f"sqlite:///{tmp_path / 'study' / 'study.db'}")
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED and trial.user_attrs["pruned_by"] == "source floor"
    args.max_source_drop = 0.5
    with pytest.raises(InputError, match="started with other settings \\(differing in max_source_drop\\)"):
        run_tune(args)
    # A value of the space that the method refuses is an error before anything runs.
    (tmp_path / "space.yaml").write_text("sparsity: {choices: [0.9, 1.5]}\n")
    with pytest.raises(InputError, match="sparsity = 1.5 is refused: .*sparsity must lie in"):
        run_tune(tiny_study(setup, tmp_path / "other", search_space=str(tmp_path / "space.yaml")))
    assert not (tmp_path / "other").exists()
    (tmp_path / "space.yaml").write_text("audit_validation_samples: {choices: [0, 200]}\n")
    with pytest.raises(InputError, match="audit_validation_samples is not a setting to search"):
        run_tune(tiny_study(setup, tmp_path / "other", search_space=str(tmp_path / "space.yaml")))
    # A grid the final audit could not draw from the trials' target train split: refused before the study.
    with pytest.raises(
        InputError, match=r"Sample counts must lie in 1\.\.\d+ \(the target train split less the held-out"
    ):
        run_tune(tiny_study(setup, tmp_path / "other", counts=[10, 100000]))
    assert not (tmp_path / "other").exists()
    # So is a data set that does not load: nothing is written, so the folder stays free for the corrected command.
    with pytest.raises(InputError, match="no-such-domain is not an embedded domain"):
        run_tune(tiny_study(setup, tmp_path / "other", target_dataset="no-such-domain"))
    assert not (tmp_path / "other").exists()


def test_a_grid_study_runs_every_combination_once_even_when_interrupted(setup, tmp_path, monkeypatch):
    (tmp_path / "grid.yaml").write_text("fisher_lambda: {choices: [1.0, 0.1]}\nalpha: {choices: [3.0, 2.0]}\n")
    args = tiny_study(setup, tmp_path / "study", trials=None, sampler="grid", search_space=str(tmp_path / "grid.yaml"))
    config_class, protect = tune.PROTECTIONS["ntp"]
    calls = []

    def interrupted_third(config):
        calls.append(config.output_dir)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return protect(config)

    monkeypatch.setitem(tune.PROTECTIONS, "ntp", (config_class, interrupted_third))
    with pytest.raises(KeyboardInterrupt):
        run_tune(args)
    # Rerun: the interrupted point is taken up again, in its folder, and the grid ends when all four are done.
    summary = run_tune(args)
    done = [t for t in summary["trials"] if t["state"] in ("complete", "pruned")]
    assert sorted((t["params"]["fisher_lambda"], t["params"]["alpha"]) for t in done) == [
        (0.1, 2.0),
        (0.1, 3.0),
        (1.0, 2.0),
        (1.0, 3.0),
    ]
    assert [t["state"] for t in summary["trials"]].count("fail") == 1 and summary["finished_trials"] == 4
    assert len(calls) == 5 and calls.count(calls[2]) == 2  # the third point again, in its own folder
    # The defaults are a point of the grid, tried once and marked as theirs.
    assert [t["params"] for t in done if t["defaults"]] == [{"fisher_lambda": 1.0, "alpha": 3.0}]
    # A range has no grid: refused before anything is written.
    with pytest.raises(InputError, match="--sampler grid needs every option .* \\['alpha'\\] are ranges"):
        run_tune(tiny_study(setup, tmp_path / "other", sampler="grid"))
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize(
    ("space", "error"),
    [
        ("alpah: {low: 0.1, high: 10}\n", "\\['alpah'\\] are not options"),
        ("alpha: {low: 0.1}\n", "must be `\\{low, high"),
        ("alpha: {low: 0.0, high: 1.0, log: true}\n", "low must be positive"),
        ("alpha: {low: 2.0, high: 1.0}\n", "low < high"),
        ("sparsity: {choices: []}\n", "non-empty list"),
        ("alpha: {low: 0.1, high: 1.0, log: true, step: 0.1}\n", "without `log`"),
        ("- alpha\n", "must map option names"),
    ],
)
def test_a_bad_search_space_is_a_clear_error(tmp_path, space, error):
    (tmp_path / "space.yaml").write_text(space)
    with pytest.raises(InputError, match=error):
        load_search_space(tmp_path / "space.yaml", NTPConfig)


def test_the_shipped_search_spaces_are_valid_and_hold_the_defaults():
    from hf_ntl.protect import DIFFUSION_PROTECTIONS, PROTECTIONS

    for method, (config_class, _) in (PROTECTIONS | DIFFUSION_PROTECTIONS).items():
        space = load_search_space(tune.default_search_space(method), config_class)
        defaults = config_class(output_dir="unused", report_to="none")
        assert all(parameter.contains(getattr(defaults, parameter.name)) for parameter in space), method
    # The sweep behind NTP's defaults is three grids; stage 2's holds them.
    benchmarks = Path(__file__).parents[1] / "benchmarks"
    assert tune.grid(load_search_space(benchmarks / "ntp_sweep_coarse.yaml", NTPConfig))
    sweep = load_search_space(benchmarks / "ntp_sweep.yaml", NTPConfig)
    defaults = NTPConfig(output_dir="unused", report_to="none")
    assert tune.grid(sweep) and all(parameter.contains(getattr(defaults, parameter.name)) for parameter in sweep)
