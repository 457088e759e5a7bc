"""Is scratch converged where two seeds cannot tell? One attack of the suite, scratch only, at 1x and 2x its budget
for more seeds, and the mean change with its standard error (README, "Is scratch converged?").

    python benchmarks/budget_seeds.py --runs_dir runs/budget-seeds

The defaults cover the three points the budget section's two seeds missed (the worst case picked `adamw-cosine-2x`
there) and font-digits at n = 1147: font-digits and textured-digits at n = 200 and 1147, seeds 0-5. Runs go through
the bench's own audit (same split, subsets, seeds and validation choice as the bench; seeds 0 and 1 reproduce its
runs), and are reused when finished. `--budget_scale` and `--weight_decay` change the attack before the comparison
(README's table of weight decays and budgets on font-digits at n = 200).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `benchmarks` as a package, from anywhere

from benchmarks import bench
from hf_ntl.errors import InputError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs_dir", default="runs/budget-seeds")
    parser.add_argument("--attack", default="adamw-cosine-2x")
    parser.add_argument("--targets", nargs="+", default=["font-digits", "textured-digits"])
    parser.add_argument("--counts", nargs="+", type=int, default=[200, 1147])
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(6)))
    parser.add_argument(
        "--budget_scale", type=int, choices=(1, 2, 4, 8), default=1, help="compare S x with 2S x the attack's budget"
    )
    parser.add_argument("--weight_decay", type=float, default=None, help="replace the attack's weight decay")
    options = parser.parse_args()
    runs = Path(options.runs_dir)
    args = bench.BenchArguments(
        runs_dir=str(runs),
        sections=["budget"],
        domains=options.targets,
        attacks=[options.attack, "full-masked"],
        counts=options.counts,
        seeds=options.seeds,
    )
    bench.check_sample_counts(args)  # before any run, as the bench does
    if options.weight_decay is not None and not options.weight_decay >= 0:  # also refuses NaN
        raise InputError(f"--weight_decay must be 0 or more, got {options.weight_decay}.")
    suite = [spec for spec in bench.bench_suite(args) if spec.name == options.attack]
    for _ in range(options.budget_scale.bit_length() - 1):  # a power of two (argparse's choices): S = 2^k
        suite = bench.doubled_budget(suite)
    if options.weight_decay is not None:
        suite = [dataclasses.replace(spec, weight_decay=options.weight_decay) for spec in suite]
    # Folders named by budget and weight decay, so neighbouring scales share their runs.
    setting = "" if options.weight_decay is None else f"-wd{options.weight_decay:g}"
    low, high = f"{options.budget_scale}x{setting}", f"{2 * options.budget_scale}x{setting}"
    decay = "" if options.weight_decay is None else f" with weight decay {options.weight_decay:g}"
    print(
        f"{options.attack}{decay}, scratch, change from {low} to {high} its budget (points): mean ± standard error (sd)"
    )
    for target in options.targets:
        accuracy = {}
        for label, specs in ((low, suite), (high, bench.doubled_budget(suite))):
            report = bench.audit(args, runs / Path(target).name / label, {}, target, suite=specs)
            accuracy[label] = {(p["num_samples"], p["seed"]): p["accuracy"] for p in report["points"]}
        for n in options.counts:
            changes = [100 * (accuracy[high][n, seed] - accuracy[low][n, seed]) for seed in options.seeds]
            spread = statistics.stdev(changes)
            print(
                f"{target} n={n}: {statistics.mean(changes):+.1f} ± {spread / len(changes) ** 0.5:.1f} ({spread:.1f}); "
                f"per seed {', '.join(f'{change:+.1f}' for change in changes)}"
            )


if __name__ == "__main__":
    try:
        main()
    except InputError as err:  # one line and status 2, as `hf-ntl` and the bench do
        print(f"budget_seeds: error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None
