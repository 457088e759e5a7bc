import pytest
from huggingface_hub import HfApi, ModelCard

from hf_ntl import cards
from hf_ntl.artifacts import read_record, write_record
from hf_ntl.attacks import load_suite
from hf_ntl.cards import _describe_attack, _leakage_note, build_card, push_to_hub, write_card
from hf_ntl.data import ImagePreprocessor
from hf_ntl.errors import InputError
from hf_ntl.evaluation import EvaluateArguments, read_report, run_evaluation
from hf_ntl.models import build_tiny_classifier


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """A tiny 'protected' model folder with an NTP-like record, and a real quick-suite report on it."""
    root = tmp_path_factory.mktemp("card")
    model_dir, original_dir = root / "protected" / "model", root / "original"
    for folder, seed in ((model_dir, 1), (original_dir, 2)):
        build_tiny_classifier("tiny-resnet", 10, seed=seed).save_pretrained(folder)
        ImagePreprocessor().save_pretrained(folder)
    record = {
        "stage": "protected",
        "method": "ntp",
        "base_model": "tiny-resnet",
        "source_model": str(original_dir),
        "dataset": "font-digits",
        "target_dataset": "uci-digits",
        "config": {"sparsity": 0.9, "alpha": 1.0},
        "data": {"source_train_samples": 1000, "target_train_samples": 134},
        "sparsity": {"overall": 0.8999987, "prunable_weights": 308016},
        "source_accuracy_before": 0.9905,
        "source_accuracy_after": 0.92,
        "wall_time_s": 26.0,
    }
    write_record(model_dir, record)
    args = EvaluateArguments(
        model_name_or_path=str(model_dir),
        original_model_name_or_path=str(original_dir),
        target_dataset="uci-digits",
        suite="quick",
        steps=2,
        counts=[10, 20],
        seeds=[0],
        output_dir=str(root / "audit"),
    )
    run_evaluation(args, progress=False)
    return model_dir, root / "audit"


def test_card_model_index_round_trips_with_plain_floats(audited, tmp_path):
    model_dir, audit = audited
    card = build_card(model_dir, audit, model_name="me/tiny-ntp")
    card.save(tmp_path / "README.md")
    text = (tmp_path / "README.md").read_text()
    assert "!!python" not in text
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.model_name == "me/tiny-ntp"
    results = {r.metric_name: r for r in loaded.data.eval_results}
    report = read_report(audit / "report.json")
    worst = report["slc_auc"]["model"]["worst_case"]
    raw = results["Worst-case SLC-AUC over the suite (raw)"]
    assert raw.metric_type == "slc_auc" and raw.dataset_name == "uci-digits"
    assert type(raw.metric_value) is float and raw.metric_value == pytest.approx(worst["slc_auc"])
    normalised = results["Worst-case SLC-AUC over the suite (normalised by the log-count range)"]
    assert normalised.metric_value == pytest.approx(worst["slc_auc_normalized"])
    strongest = report["slc_auc"]["model"]["strongest_attack"]
    assert f"SLC-AUC of the strongest attack, {strongest} (raw)" in results
    assert results["Original-domain accuracy (this model)"].metric_value == 0.92
    assert results["Original-domain accuracy before protection"].metric_value == 0.9905
    assert results["Sparsity of the prunable weights"].metric_value == pytest.approx(0.8999987)
    assert all(type(r.metric_value) is float for r in loaded.data.eval_results)
    # Local paths and embedded domains are not Hub ids: no base_model/datasets metadata that would not resolve.
    assert loaded.data.base_model is None and loaded.data.datasets is None


def test_card_body_shows_the_plot_the_attack_table_and_the_limits(audited):
    model_dir, audit = audited
    content = build_card(model_dir, audit).content
    assert "![Worst-case learning curves" in content and "(learning_curves.png)" in content
    for attack in ("full", "head-only", "lora-r4"):
        assert f"| {attack} |" in content
    assert "non-transferable" in content and "hf-ntl protect-ntp" in content
    assert "## Limits of this evaluation" in content and "TransNTL" in content
    assert "92.00 %" in content and "99.05 %" in content


def test_write_card_puts_card_and_plot_in_the_model_folder_and_push_uploads_them(audited, monkeypatch):
    model_dir, audit = audited
    write_card(model_dir, audit)
    assert (model_dir / "README.md").is_file() and (model_dir / "learning_curves.png").is_file()
    assert not list(model_dir.glob(".README*"))
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = (repo_id, kwargs)

    def upload_folder(self, **kwargs):
        calls["upload"] = kwargs
        return "https://huggingface.co/me/tiny-ntp/commit/abc"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    url = push_to_hub(model_dir, "me/tiny-ntp")
    assert url.endswith("/commit/abc")
    assert calls["create"] == ("me/tiny-ntp", {"repo_type": "model", "private": True, "exist_ok": True})
    upload = calls["upload"]
    assert upload["repo_id"] == "me/tiny-ntp" and upload["folder_path"] == str(model_dir)
    uploaded = {p.name for p in model_dir.iterdir() if any(p.match(pattern) for pattern in upload["allow_patterns"])}
    assert {"model.safetensors", "config.json", "README.md", "learning_curves.png", "hf_ntl.json"} <= uploaded


def test_cards_refuse_missing_or_mismatched_inputs(audited, tmp_path):
    model_dir, audit = audited
    with pytest.raises(InputError, match="No report.json"):
        build_card(model_dir, tmp_path)
    with pytest.raises(InputError, match="No hf_ntl.json"):
        build_card(tmp_path, audit)
    other = tmp_path / "other"
    build_tiny_classifier("tiny-resnet", 10).save_pretrained(other)
    write_record(other, {"stage": "source", "base_model": "tiny-resnet", "dataset": "uci-digits"})
    with pytest.raises(ValueError, match="evaluates .* not "):
        build_card(other, audit)
    with pytest.raises(InputError, match="lacks README.md .*hf-ntl card"):
        push_to_hub(other, "me/x")


def test_card_says_when_the_leakage_check_could_not_be_made(audited):
    model_dir, audit = audited
    text = build_card(model_dir, audit).text
    # Neither folder records its training data (written by hand above): the card must not claim a check.
    assert "**Leakage check**: not possible" in text and "hold none of the test images" not in text
    assert "validation images" not in text
    unchecked = text.split("No record of training data for: ")[1].split(" (not checked)")[0]
    assert sorted(unchecked.split(", ")) == sorted([str(model_dir), str(model_dir.parent.parent / "original")])
    assert "n = 10: 2 steps, n = 20: 2 steps" in text  # the budget each n got


def test_the_attack_table_tells_the_attacks_beyond_the_simulated_attackers_apart():
    described = {spec.name: _describe_attack(spec.to_dict()) for spec in load_suite("default")}
    assert "fresh last stage, fresh head" in described["reinit-last-stage"]
    assert "fresh last stage" not in described["full-reinit-head"]
    assert "adamw lr 0.01 wd 0.01 (cosine after 10% warm-up)" in described["adamw-cosine-2x"]
    assert "30 epochs, at least 300 steps, at most 2400" in described["adamw-cosine-2x"]


def test_leakage_note_says_what_was_checked_on_the_validation_split():
    clean = {"counts": {"model": {"protection: target train [m]": 0}}, "unrecorded": {"model": []}, "total": 0}
    leaky = {**clean, "counts": {"model": {"protection: target train [m]": 4}}, "total": 4, "allowed": True}
    assert "None of the validation images the worst case is chosen on was trained on." in _leakage_note(clean, clean)
    assert "**4 of the validation images the worst case is chosen on were trained on**" in _leakage_note(clean, leaky)
    assert "were not checked (an older report)" in _leakage_note(clean, None)


def test_card_says_how_string_labels_were_encoded(audited, monkeypatch):
    model_dir, audit = audited
    assert "Labels were encoded" not in build_card(model_dir, audit).text  # class ids: nothing to say

    def with_encoding(classes):
        encoding = {"column": "species", "classes": {str(i): name for i, name in enumerate(classes)}}
        monkeypatch.setattr(cards, "read_record", lambda folder: {**read_record(folder), "label_encoding": encoding})
        return build_card(model_dir, audit).text

    assert "\nLabels were encoded from the string column `species`: 0 = cat, 1 = dog.\n" in with_encoding(
        ["cat", "dog"]
    )
    many = with_encoding([f"c{i}" for i in range(25)])
    assert "0 = c0, 1 = c1," in many and "19 = c19, and 5 more (all in `config.json`'s `id2label`)." in many
    assert "20 = c20" not in many


def test_the_configuration_table_shows_the_sparsity_a_default_run_took():
    took_the_default = {"config": {"sparsity": None, "alpha": 3.0}, "sparsity": {"target": 0.3, "overall": 0.3}}
    assert cards.config_items(took_the_default) == [
        ("alpha", 3.0),
        ("sparsity", "0.3 (the default for this architecture)"),
    ]
    asked = {"config": {"sparsity": 0.6}, "sparsity": {"target": 0.6, "overall": 0.6}}
    assert cards.config_items(asked) == [("sparsity", 0.6)]
