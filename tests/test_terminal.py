"""What a user sees: one-line input errors with exit status 2, tracebacks for bugs and on request,
quiet training stages with their logs in a file, and `evaluate --dry_run`."""

import json
import os
import subprocess
import sys

import pytest
from transformers import TrainerState, TrainingArguments

import hf_ntl.evaluation
from hf_ntl.attacks.suite import load_suite
from hf_ntl.cli import COMMANDS, _take_flag, main
from hf_ntl.data import ImagePreprocessor
from hf_ntl.models import build_tiny_classifier
from hf_ntl.terminal import TRAINING_LOG, TrainingLogFile, console, format_duration, track


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """An untrained tiny classifier folder for uci-digits (10 classes) with its preprocessing."""
    folder = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_classifier("tiny-resnet", 10).save_pretrained(folder)
    ImagePreprocessor(image_size=32).save_pretrained(folder)
    return folder


def _input_errors(tmp_path, tiny_model):
    """The input errors the README lists: (argv, words the one-line message must hold)."""
    finished = tmp_path / "finished-audit"
    finished.mkdir()
    (finished / "report.json").write_text("{}")
    evaluate = ["evaluate", "--model_name_or_path", str(tiny_model), "--suite", "quick", "--seeds", "0"]
    missing_data = tmp_path / "nowhere" / "data"
    return [
        (["evaluate", "--model_name_or_path", "m", "--countz", "10"], "unknown options: --countz 10"),
        (["evaluate", "--config", str(tmp_path / "missing.yaml")], "does not exist"),
        (["fit-source", "--image_size", "3"], "image_size must be at least 8"),
        (["evaluate", "--model_name_or_path", str(tmp_path / "no" / "such")], "no such folder"),
        (["fit-source", "--dataset_name", str(missing_data), "--output_dir", str(tmp_path / "s")], "no such folder"),
        ([*evaluate, "--attacks", "ful"], "Unknown attack name(s) ['ful']"),
        ([*evaluate, "--counts", "10", "5000"], "Sample counts must lie in 1..1147"),
        ([*evaluate, "--counts", "10", "20", "--output_dir", str(finished)], "already holds a finished result"),
    ]


def test_each_input_error_is_one_line_with_status_2(tmp_path, tiny_model, capsys):
    for argv, words in _input_errors(tmp_path, tiny_model):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2, argv
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in captured.err, (argv, captured.err)
        assert lines[0].startswith(f"hf-ntl {argv[0]}: error: ") and words in lines[0], (argv, lines[0])


def test_unknown_command_and_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["protekt"])
    assert exit_info.value.code == 2 and "unknown command 'protekt'" in capsys.readouterr().err
    main(["--version"])
    assert capsys.readouterr().out.startswith("hf-ntl 0.")


def test_debug_without_a_value_is_ours_with_one_it_is_training_arguments():
    argv = ["fit-source", "--debug", "underflow_overflow", "--verbose", "--debug"]
    assert _take_flag(argv, "--debug") and _take_flag(argv, "--verbose")
    assert argv == ["fit-source", "--debug", "underflow_overflow"]
    assert not _take_flag(argv, "--debug")


def test_an_interrupted_command_says_so_in_one_line(monkeypatch, capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setitem(COMMANDS, "card", (interrupted, "interrupted"))
    with pytest.raises(SystemExit) as exit_info:
        main(["card"])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip().startswith("hf-ntl card: interrupted (rerun the same command to resume")


def test_debug_shows_the_traceback_and_bugs_keep_theirs(monkeypatch):
    # In a real process: one line and status 2 by default; the traceback with HF_NTL_DEBUG=1.
    command = [sys.executable, "-m", "hf_ntl.cli", "fit-source", "--image_size", "3"]
    plain = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_NTL_DEBUG": "0"})
    assert plain.returncode == 2 and plain.stderr.strip().count("\n") == 0 and "Traceback" not in plain.stderr
    debug = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_NTL_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "image_size must be at least 8" in debug.stderr

    def broken(argv):
        raise RuntimeError("a bug, not the user's input")

    monkeypatch.setitem(COMMANDS, "card", (broken, "broken"))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["card"])


def test_training_is_quiet_logs_go_to_a_file_and_verbose_restores_them(tmp_path, capsys):
    fit = ["fit-source", "--dataset_name", "uci-digits", "--max_steps", "6", "--logging_steps", "2"]
    fit += ["--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none"]
    main([*fit, "--output_dir", str(tmp_path / "quiet")])
    captured = capsys.readouterr()
    assert "{'loss'" not in captured.out + captured.err and "'train_runtime'" not in captured.out + captured.err
    assert "source fit" in captured.err and "6/6" in captured.err  # the stage's one progress display
    assert captured.out.strip().startswith("source model:")
    logs = [json.loads(line) for line in (tmp_path / "quiet" / TRAINING_LOG).read_text().splitlines()]
    assert [log["step"] for log in logs if "loss" in log] == [2, 4, 6] and any("train_runtime" in log for log in logs)

    main([*fit, "--output_dir", str(tmp_path / "verbose"), "--verbose"])
    captured = capsys.readouterr()
    assert "'loss'" in captured.out + captured.err and "source fit" not in captured.err


def test_dry_run_checks_and_plans_without_training_or_writing(tmp_path, tiny_model, capsys, monkeypatch):
    def no_audit(*args, **kwargs):
        raise AssertionError("a dry run must not run the audit")

    monkeypatch.setattr(hf_ntl.evaluation, "run_attacks", no_audit)
    out = tmp_path / "audit"
    argv = ["evaluate", "--model_name_or_path", str(tiny_model), "--suite", "quick", "--counts", "10", "20"]
    main([*argv, "--seeds", "0", "1", "--output_dir", str(out), "--dry_run"])
    printed = capsys.readouterr().out
    runs = len(load_suite("quick")) * 2 * 2 * 2  # attacks x (model, scratch) x seeds x counts
    assert f"{runs} ({len(load_suite('quick'))} attacks x 2 models x 2 seeds x 2 counts)" in printed
    assert "estimated time" in printed and "images trained on: 0 test, 0 validation" in printed
    assert not out.exists()


def test_the_training_log_reads_as_one_run_after_a_resume(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    log, state = TrainingLogFile(), TrainerState()
    (tmp_path / TRAINING_LOG).write_text('{"step": 3, "loss": 9.0}\n')  # a previous run in this folder
    log.on_train_begin(args, state, None)
    for step in (1, 2, 3):
        state.global_step = step
        log.on_log(args, state, None, logs={"loss": float(step)})
    state.global_step = 2  # resumed from the checkpoint of step 2: step 3 will be logged again
    log.on_train_begin(args, state, None)
    state.global_step = 3
    log.on_log(args, state, None, logs={"loss": 3.5})
    lines = [json.loads(line) for line in (tmp_path / TRAINING_LOG).read_text().splitlines()]
    assert [(line["step"], line["loss"]) for line in lines] == [(1, 1.0), (2, 2.0), (3, 3.5)]


def test_off_a_terminal_a_display_prints_a_line_at_every_tenth(capsys):
    assert not console.is_terminal  # pytest captures stderr
    for _ in track(range(40), "audit", total=40):
        pass
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split()[1] for line in lines] == [f"{4 * k}/40" for k in range(1, 10)] + ["40/40"]


def test_durations_read_as_a_person_says_them():
    assert [format_duration(s) for s in (42, 720, 12240)] == ["42 s", "12 min", "3.4 h"]
