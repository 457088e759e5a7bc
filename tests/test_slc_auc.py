import math

import evaluate
import pytest

from hf_ntl.metrics.learning_curve import CurvePoint, mean_curve, selected_curve
from hf_ntl.metrics.slc_auc import SLC_AUC_MODULE, area_under_log_curve, slc_auc

COUNTS = [10, 50, 200]
MODEL = [0.40, 0.70, 0.90]
SCRATCH = [0.20, 0.60, 0.95]


def hand_area(counts, accuracies):
    return sum(
        (math.log(counts[i]) - math.log(counts[i - 1])) * (accuracies[i] + accuracies[i - 1]) / 2
        for i in range(1, len(counts))
    )


def test_area_matches_a_hand_computation():
    # ln5 * 0.55 + ln4 * 0.80
    assert area_under_log_curve(COUNTS, MODEL) == pytest.approx(math.log(5) * 0.55 + math.log(4) * 0.80, abs=1e-12)
    assert area_under_log_curve(COUNTS, MODEL) == pytest.approx(hand_area(COUNTS, MODEL), abs=1e-12)


def test_raw_and_normalised_slc_auc():
    score = slc_auc(COUNTS, MODEL, SCRATCH)
    raw = hand_area(COUNTS, MODEL) - hand_area(COUNTS, SCRATCH)
    assert score["slc_auc"] == pytest.approx(raw, abs=1e-12)
    assert score["slc_auc_normalized"] == pytest.approx(raw / math.log(200 / 10), abs=1e-12)
    # Fractions of a train set give the same numbers: only differences of logs enter.
    fractions = [n / 1347 for n in COUNTS]
    assert slc_auc(fractions, MODEL, SCRATCH)["slc_auc"] == pytest.approx(raw, abs=1e-12)


def test_extremes_of_the_range():
    perfect, useless = [1.0] * 3, [0.0] * 3
    assert slc_auc(COUNTS, perfect, useless)["slc_auc"] == pytest.approx(math.log(20))
    assert slc_auc(COUNTS, perfect, useless)["slc_auc_normalized"] == pytest.approx(1.0)
    assert slc_auc(COUNTS, useless, perfect)["slc_auc_normalized"] == pytest.approx(-1.0)
    assert slc_auc(COUNTS, MODEL, MODEL)["slc_auc"] == 0.0
    # The reference grid of ALGORITHMS.md spans ln(1000) = 6.91.
    grid = [0.001, 0.002, 0.005, 0.008, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0]
    assert slc_auc(grid, [1.0] * 10, [0.0] * 10)["slc_auc"] == pytest.approx(6.9078, abs=1e-4)


def test_bad_grids():
    with pytest.raises(ValueError, match="at least two"):
        slc_auc([10], [0.5], [0.4])
    with pytest.raises(ValueError, match="strictly increasing"):
        slc_auc([50, 10], [0.5, 0.6], [0.4, 0.5])
    with pytest.raises(ValueError, match="2 accuracies for 3"):
        slc_auc(COUNTS, [0.5, 0.6], SCRATCH)


def test_evaluate_module_gives_the_same_numbers():
    metric = evaluate.load(SLC_AUC_MODULE)
    result = metric.compute(predictions=MODEL, references=SCRATCH, sample_counts=COUNTS)
    expected = slc_auc(COUNTS, MODEL, SCRATCH)
    assert result == pytest.approx(expected)


def test_mean_curves_of_test_and_validation_accuracy():
    points = [
        CurvePoint("model", "a", n, seed, accuracy, 1 - accuracy, 1, 0.0)
        for n, seed, accuracy in [(10, 0, 0.2), (10, 1, 0.4), (50, 0, 0.6), (50, 1, 0.8)]
    ]
    assert mean_curve(points) == pytest.approx({10: 0.3, 50: 0.7})
    assert mean_curve(points, "validation_accuracy") == pytest.approx({10: 0.7, 50: 0.3})


def test_worst_case_is_chosen_on_validation_and_read_on_test():
    # Test and validation disagree: at n = 10 attack b is best on test but c on validation; at n = 50
    # a is best on test, b on validation. The worst case must follow validation.
    test = {"a": {10: 0.3, 50: 0.9}, "b": {10: 0.6, 50: 0.5}, "c": {10: 0.4, 50: 0.7}}
    validation = {"a": {10: 0.2, 50: 0.5}, "b": {10: 0.3, 50: 0.8}, "c": {10: 0.5, 50: 0.6}}
    curve, chosen = selected_curve(test, validation)
    assert chosen == {10: "c", 50: "b"}
    assert curve == {10: 0.4, 50: 0.5}
    assert curve != {n: max(t[n] for t in test.values()) for n in (10, 50)}  # not the test argmax
    # Ties go to the attack listed first, whatever the test split says.
    tied = {"a": {10: 0.5}, "b": {10: 0.5}}
    assert selected_curve({"a": {10: 0.1}, "b": {10: 0.9}}, tied) == ({10: 0.1}, {10: "a"})
