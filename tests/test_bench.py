"""`make bench` wiring on three tiny save_to_disk domains: every stage runs, the results add up, stages are reused."""

import dataclasses
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from PIL import Image as PILImage
from safetensors.torch import load_file, save_file

from hf_ntl.errors import InputError
from hf_ntl.metrics.plots import plot_pair_heatmaps

BENCH = Path(__file__).parent.parent / "benchmarks" / "bench.py"
spec = importlib.util.spec_from_file_location("bench", BENCH)
bench = importlib.util.module_from_spec(spec)
sys.modules["bench"] = bench
spec.loader.exec_module(bench)


def tiny_domain(folder: Path, seed: int) -> str:
    """96 train / 24 test random 16x16 images in 4 classes (each class a different tint, so there is a signal)."""
    rng = np.random.default_rng(seed)

    def split(n):
        labels = [i % 4 for i in range(n)]
        pictures = []
        for label in labels:
            pixels = rng.integers(0, 128, (16, 16, 3))
            pixels[..., label % 3] += 64 * (1 + label // 3)
            pictures.append(PILImage.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
        return {"image": pictures, "label": labels}

    features = Features({"image": Image(), "label": ClassLabel(names=list("abcd"))})
    DatasetDict(
        train=Dataset.from_dict(split(96), features=features),
        test=Dataset.from_dict(split(24), features=features),
    ).save_to_disk(str(folder))
    return str(folder)


def pair_dir(root: Path, pair: dict) -> Path:
    return root / "runs" / "quality" / f"{Path(pair['source']).name}__{Path(pair['target']).name}"


def write_yaml(path: Path, values: dict) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    domains = [tiny_domain(root / name, seed) for seed, name in enumerate(["red", "green", "blue"])]
    small = {"source_fraction": 1.0, "target_fraction": 1.0, "per_device_train_batch_size": 8, "use_cpu": True}
    argv = [
        "--runs_dir", str(root / "runs"), "--output_dir", str(root / "results"), "--domains", *domains,
        "--sections", "quality", "architectures", "budget", "diffusion", "cost",
        "--source_steps", "3", "--architectures", "tiny-vit", "--suite", "quick", "--attack_steps", "2",
        "--counts", "4", "8", "--seeds", "0",
        "--validation_samples", "16", "--diffusion_validation_samples", "12", "--audit_processes", "1",
        "--ntp_config", write_yaml(root / "ntp.yaml", {
            **small, "admm_rounds": 1, "steps_per_round": 3, "retrain_steps": 2, "probe_steps": 5}),
        "--sophon_config", write_yaml(root / "sophon.yaml", {
            **small, "iterations": 2, "guard_every": 1, "inner_steps": 1, "environments": 1,
            "inner_batch_sizes": [10], "query_size": 4, "guard_samples": 8, "guard_threshold": 0.0}),
        "--ddpm_config", write_yaml(root / "ddpm.yaml", {
            "max_steps": 2, "per_device_train_batch_size": 8, "eval_samples": 8, "eval_timesteps": 2}),
        "--sophon_diffusion_config", write_yaml(root / "sophon-diffusion.yaml", {
            **small, "iterations": 2, "guard_every": 1, "inner_steps": 1, "environments": 1,
            "inner_batch_sizes": [10], "query_size": 4, "guard_samples": 8}),
        "--diffusion_counts", "4", "8", "--diffusion_attack_steps", "2", "--diffusion_test_samples", "8",
        "--diffusion_eval_timesteps", "2",
        "--cost_models", "tiny-resnet", "--cost_steps", "2", "--cost_sophon_iterations", "1",
        "--cost_inner_steps", "1", "3",
    ]  # fmt: skip
    bench.main(argv)
    return root, argv, domains


def test_every_section_runs_and_the_results_add_up(tiny_bench):
    root, _, domains = tiny_bench
    results = json.loads((root / "results" / "results.json").read_text())
    pairs = results["quality"]["pairs"]
    assert [(p["source"], p["target"]) for p in pairs] == [(s, t) for s in domains for t in domains if s != t]
    for pair in pairs:
        report = json.loads((pair_dir(root, pair) / "audit" / "report.json").read_text())
        assert set(report["slc_auc"]) == {"original", "ntp", "sophon"}
        assert {p["model"] for p in report["points"]} == {"original", "ntp", "sophon", "scratch"}
        assert report["target_validation_samples"] == 16 and report["target_train_samples"] == 96 - 16
        assert pair["test_overlap"] == 0 == report["test_overlap"]["total"]
        # The pairs attacking one target share one scratch baseline: its runs, not a rerun of them.
        target = Path(pair["target"]).name
        shared = json.loads((root / "runs" / "scratch" / target / "report.json").read_text())
        assert [p for p in report["points"] if p["model"] == "scratch"] == shared["points"]
        assert all(report["test_overlap"]["counts"][label] for label in ("original", "ntp", "sophon"))
        for label in ("original", "ntp", "sophon"):
            assert pair[label]["masked"] == report["slc_auc"][label]["per_attack"]["full-masked"]
            assert pair[label]["worst_case"] == report["slc_auc"][label]["worst_case"]
        ntp_record = json.loads((pair_dir(root, pair) / "ntp" / "model" / "hf_ntl.json").read_text())
        assert pair["ntp"]["source_accuracy"] == ntp_record["source_accuracy_after"]
        assert ntp_record["sparsity"]["overall"] == pytest.approx(0.9, abs=1e-3)
    averages = results["quality"]["averages"]
    for label in ("original", "ntp", "sophon"):
        expected = statistics.mean(p[label]["worst_case"]["slc_auc_normalized"] for p in pairs)
        assert averages[label]["worst_case_slc_auc_normalized"] == pytest.approx(expected)

    # The architectures section: the first pair again, every stage on the ViT preset, scratch included.
    vit = results["architectures"]["models"]["tiny-vit"]
    assert (vit["source"], vit["target"]) == (domains[0], domains[1]) and vit["test_overlap"] == 0
    vit_runs = root / "runs" / "architectures" / "tiny-vit"
    vit_pair = vit_runs / "quality" / "red__green"
    for label in ("original", "ntp", "sophon"):
        folder = vit_runs / "sources" / "red" / "model" if label == "original" else vit_pair / label / "model"
        assert json.loads((folder / "config.json").read_text())["model_type"] == "vit", label
    scratch = json.loads((vit_runs / "scratch" / "green" / "report.json").read_text())
    assert scratch["model"] == "tiny-vit"
    vit_report = json.loads((vit_pair / "audit" / "report.json").read_text())
    assert [p for p in vit_report["points"] if p["model"] == "scratch"] == scratch["points"]
    assert vit["ntp"]["worst_case"] == vit_report["slc_auc"]["ntp"]["worst_case"]
    # NTP's default sparsity follows the architecture: the ViT has no BatchNorm (the ResNets above got 0.9).
    assert json.loads((vit_pair / "ntp" / "model" / "hf_ntl.json").read_text())["sparsity"]["target"] == 0.3

    # The budget check compares the pair audits' scratch runs with scratch at twice the steps.
    budget = results["budget"]["targets"]
    assert list(budget) == domains
    for pair in pairs:
        report = json.loads((pair_dir(root, pair) / "audit" / "report.json").read_text())
        for n, row in budget[pair["target"]].items():
            assert row["worst_case"] == report["worst_case_curves"]["scratch"][n]
            assert row["steps"] == [2] and row["doubled_steps"] == [4]

    diffusion = results["diffusion"]
    assert set(diffusion["worst_case_restricted_mse"]) == {"sophon", "original", "scratch"}
    assert all(v > 0 for curve in diffusion["worst_case_restricted_mse"].values() for v in curve.values())

    cost = results["cost"]["models"]["tiny-resnet"]
    assert cost["plain_step_s"] > 0 and cost["ntp_over_plain"] == pytest.approx(
        cost["ntp_step_s"] / cost["plain_step_s"]
    )
    assert cost["fts_peak_mib_k1"] > 0 and cost["fts_peak_mib_k3"] > 0

    markdown = (root / "results" / "results.md").read_text()
    assert "## Protection quality" in markdown and "## Diffusion" in markdown and "## Cost" in markdown
    assert "## Is the scratch baseline converged?" in markdown
    assert "## Protection on other architectures" in markdown
    assert "| tiny-resnet (quality section) |" in markdown and "| tiny-vit |" in markdown
    assert markdown.count(" → ") >= 6 and "NTP reference notebooks" in markdown
    assert (root / "results" / "slc_auc_heatmap.png").stat().st_size > 10_000


def test_a_second_run_reuses_every_stage_and_other_settings_are_refused(tiny_bench, capsys):
    root, argv, _ = tiny_bench
    before = json.loads((root / "results" / "results.json").read_text())
    stages = sorted(root.rglob("report.json")) + sorted(root.rglob("hf_ntl.json"))
    written = {path: path.stat().st_mtime_ns for path in stages}
    bench.main(argv)
    out = capsys.readouterr().out
    # Sections are recomputed from their stages, every stage reused (none written again); the cost timings whole.
    assert {path: path.stat().st_mtime_ns for path in stages} == written
    assert "protecting" not in out and "fitting" not in out and "reusing" in out
    after = json.loads((root / "results" / "results.json").read_text())

    def untimed(section):
        return {key: value for key, value in section.items() if key != "wall_time_s"}

    assert untimed(after["quality"]) == untimed(before["quality"]) and after["cost"] == before["cost"]
    with pytest.raises(InputError, match="other settings"):
        bench.run([*argv[: argv.index("--seeds") + 1], "1", *argv[argv.index("--seeds") + 2 :]])


def with_option(argv: list[str], name: str, *values: str) -> list[str]:
    """`argv` with option `name`'s values replaced by `values`."""
    start = argv.index(name) + 1
    end = next((i for i in range(start, len(argv)) if argv[i].startswith("--")), len(argv))
    return [*argv[:start], *values, *argv[end:]]


def test_a_section_alone_reuses_the_stages_and_writes_only_its_results(tiny_bench, tmp_path):
    root, argv, _ = tiny_bench
    stages = sorted(root.rglob("report.json")) + sorted(root.rglob("hf_ntl.json"))
    written = {path: path.stat().st_mtime_ns for path in stages}
    # (Another preset list is not another bench run: each preset's stages are identified on their own.)
    budget = with_option(with_option(argv, "--sections", "budget"), "--architectures", "tiny-convnext")
    architectures = with_option(argv, "--sections", "architectures")
    for section, section_argv, heading in (
        ("budget", budget, "## Is the scratch baseline converged?"),
        ("architectures", architectures, "## Protection on other architectures"),
    ):
        bench.main(with_option(section_argv, "--output_dir", str(tmp_path / section)))
        markdown = (tmp_path / section / "results.md").read_text()
        assert heading in markdown and "## Protection quality" not in markdown and "## Cost" not in markdown
    assert {path: path.stat().st_mtime_ns for path in stages} == written
    # The budget section compares with the quality section's scratch runs: without them it says so, early.
    with pytest.raises(InputError, match="run the quality section"):
        bench.run(with_option(with_option(argv, "--sections", "budget"), "--runs_dir", str(tmp_path / "fresh")))


def test_a_changed_protection_setting_reruns_that_protection_and_its_audits_only(tiny_bench, capsys):
    root, argv, _ = tiny_bench
    ntp_yaml = root / "ntp.yaml"
    write_yaml(ntp_yaml, {**yaml.safe_load(ntp_yaml.read_text()), "retrain_steps": 3})  # as a changed default would
    kept = sorted(root.rglob("sophon/model/hf_ntl.json")) + sorted((root / "runs" / "scratch").rglob("report.json"))
    pair_audits = sorted((root / "runs" / "quality").rglob("audit/report.json"))
    written = {path: path.stat().st_mtime_ns for path in kept + pair_audits}
    bench.main(argv)
    out = capsys.readouterr().out
    # The NTP protections of the older setting are replaced, not refused, and the audits of their pairs redone
    # (same paths, new weights); SOPHON's protections and the scratch baselines are reused.
    records = [json.loads(path.read_text()) for path in root.rglob("ntp/model/hf_ntl.json")]
    assert len(records) == 6 + 1  # the six pairs and the architectures section's ViT
    assert out.count("with ntp") == 7 and "with sophon" not in out and "fitting" not in out
    assert all(record["config"]["retrain_steps"] == 3 for record in records)
    assert all(path.stat().st_mtime_ns == written[path] for path in kept)
    assert len(pair_audits) == 6 and all(path.stat().st_mtime_ns != written[path] for path in pair_audits)


def test_a_source_refitted_in_place_reruns_its_protections_and_their_audits(tiny_bench, capsys):
    root, argv, domains = tiny_bench
    # As a source fit of other settings would leave it: other weights at the same path.
    weights = root / "runs" / "sources" / "red" / "model" / "model.safetensors"
    tensors = load_file(weights)
    save_file(
        {name: tensor + 1e-3 if tensor.is_floating_point() else tensor for name, tensor in tensors.items()}, weights
    )
    pair_audits = {path: path.stat().st_mtime_ns for path in (root / "runs" / "quality").rglob("audit/report.json")}
    bench.main(argv)
    out = capsys.readouterr().out
    # Both protections of the red model against each other domain; nothing else is protected again.
    assert out.count("protecting the") == 4 and out.count(f"protecting the {domains[0]} model") == 4
    redone = {path.parent.parent.name for path, mtime in pair_audits.items() if path.stat().st_mtime_ns != mtime}
    assert redone == {"red__green", "red__blue"}


def _plan_rows(printed: str) -> dict[str, list[str]]:
    """`--dry_run`'s stages: name -> [to run, reused, attack runs to run (when it has any)]."""
    rows = {}
    for line in printed.splitlines():
        words = line.split()
        figures = [word for word in words if word.isdigit()]
        if words and words[0] in ("source", "ntp", "sophon", "scratch", "audit") and figures:
            rows[" ".join(words[: len(words) - len(figures)])] = figures
    return rows


def test_dry_run_sees_what_is_finished_and_writes_nothing(tiny_bench, tmp_path, capsys):
    _, argv, _ = tiny_bench
    bench.main([*argv, "--dry_run"])
    finished = _plan_rows(capsys.readouterr().out)
    # After the full run, every stage is one the bench would reuse: the plan uses the bench's own predicates.
    assert len(finished) == 1 + 2 + 3 + 6 + 3  # sources, protections, scratch, pair audits, doubled scratch
    assert finished["source models"] == ["0", "3"] and finished["ntp protections"] == ["0", "6"]
    assert all(figures[:2] == ["0", "1"] for name, figures in finished.items() if "audit" in name or "twice" in name)

    fresh = tmp_path / "fresh"
    bench.main([*argv[:1], str(fresh), *argv[2:], "--dry_run"])
    planned = _plan_rows(capsys.readouterr().out)
    per_model = len(bench.bench_suite(bench.BenchArguments(suite="quick"))) * 1 * 2  # attacks x seeds x counts
    assert planned["source models"] == ["3", "0"]
    assert planned["scratch audit on red"] == ["1", "0", str(per_model)]
    assert planned["audit red -> green"] == ["1", "0", str(3 * per_model)]
    assert not fresh.exists()


def test_bad_bench_arguments_are_refused_before_any_work():
    with pytest.raises(ValueError, match="Unknown sections"):
        bench.BenchArguments(sections=["speed"])
    with pytest.raises(ValueError, match="at least two domains"):
        bench.BenchArguments(domains=["uci-digits"])
    with pytest.raises(ValueError, match="architectures section\\(s\\) need at least two domains"):
        bench.BenchArguments(sections=["architectures"], domains=["uci-digits"])
    with pytest.raises(ValueError, match="Unknown architectures"):
        bench.BenchArguments(architectures=["tiny-swin"])
    with pytest.raises(ValueError, match="Unknown cost models"):
        bench.BenchArguments(cost_models=["resnet-152"])


def test_sample_counts_a_target_cannot_supply_are_refused_before_any_training(tmp_path, capsys):
    domains = [tiny_domain(tmp_path / name, seed) for seed, name in enumerate(["red", "green"])]
    common = ["--runs_dir", str(tmp_path / "runs"), "--output_dir", str(tmp_path / "results"), "--domains", *domains]
    common += ["--validation_samples", "16", "--diffusion_validation_samples", "6"]
    with pytest.raises(InputError, match=r"Sample counts must lie in 1..80 \(.*red's train split less 16 validation"):
        bench.run([*common, "--sections", "quality", "--counts", "10", "500"])
    with pytest.raises(InputError, match=r"Sample counts must lie in 1..90"):
        bench.run([*common, "--sections", "diffusion", "--diffusion_counts", "10", "500"])
    # The architectures section alone attacks the second domain: its counts are checked as early.
    with pytest.raises(InputError, match=r"Sample counts must lie in 1..80 \(.*green's train split less 16 validation"):
        bench.run([*common, "--sections", "architectures", "--counts", "10", "500"])
    with pytest.raises(InputError, match=r"96 train samples.*validation split of 200"):
        bench.run([*common, "--sections", "quality", "--validation_samples", "200"])
    # On the command line: one line, status 2, as `hf-ntl` does.
    capsys.readouterr()  # (what writing the domains printed, when this test runs first)
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*common, "--sections", "quality", "--validation_samples", "200"])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and error.startswith("bench: error: ") and "\n" not in error
    assert not (tmp_path / "runs").exists()  # nothing written, so the corrected command starts cleanly


def test_the_heatmap_leaves_the_diagonal_blank_and_writes_a_png(tmp_path):
    domains = ["a", "b", "c"]
    panel = {(s, t): 0.1 * i for i, (s, t) in enumerate((s, t) for s in domains for t in domains if s != t)}
    plot_pair_heatmaps({"one": panel, "two": panel}, domains, tmp_path / "h.png", "t", columns=2, value_label="v")
    assert (tmp_path / "h.png").stat().st_size > 5_000


def test_an_audit_spread_over_two_processes_equals_one_process(tmp_path):
    target = tiny_domain(tmp_path / "blue", 2)
    suite = bench.load_suite("quick", steps=2)
    args = bench.BenchArguments(counts=[4, 8], seeds=[0], validation_samples=16, audit_processes=1)
    single = bench.audit(args, tmp_path / "one", {}, target, suite=suite)
    double = bench.audit(dataclasses.replace(args, audit_processes=2), tmp_path / "two", {}, target, suite=suite)
    assert double["processes"] == 2 and single["processes"] == 1

    def without_time(points):
        return sorted(
            [{k: v for k, v in p.items() if k != "seconds"} for p in points],
            key=lambda p: json.dumps(p, sort_keys=True),
        )

    assert without_time(double["points"]) == without_time(single["points"])
    assert double["worst_case_curves"] == single["worst_case_curves"]


def test_the_hub_attack_step_is_timed_over_exactly_the_steps_asked():
    # The suite's budget grows with the data: a "1-step" and a "4-step" run on 32 samples both took 60 steps.
    args = bench.BenchArguments()
    assert [bench.hub_attack(args, steps).steps_for(32) for steps in (1, 4)] == [1, 4]
    assert bench.hub_attack(args, 4).batch_size == args.hub_batch_size
