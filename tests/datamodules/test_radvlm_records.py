"""Records written the way RadVLM's dataset builders write them: no ``task`` key, the task in the id prefix.

RadVLM names every record ``f"{id_prefix}_{index}"`` (its ``create_llava_dataset.py``); train prefixes end in
``-train`` (optionally numbered), test prefixes in ``-test``. Each builder's record shape is reproduced here:
the prompt starts with ``<image>\\n``, answers hold two-decimal boxes, label records carry ``labels`` and
``pathologies``, conversations have several turns, and no record has ``boxes`` or ``task``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import main
from datamodules.collate import PromptCollator
from datamodules.datamodule import RadVLMDataModule
from datamodules.records import RecordError, load_records
from radvlm.rewards import RewardTerm
from radvlm.tasks import (
    BOX_TASKS,
    ID_SOURCES,
    RADVLM_EVAL_TASKS,
    TASKS,
    canonical_task,
    is_box_task,
    task_from_id,
    task_kind,
)
from tests.helpers import write_records

REPORT_Q = "<image>\nWrite a radiology report for this Chest X-ray."
NO_FINDING = "No abnormalities or lesions are detected on this Chest X-ray."


def turn(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def radvlm_record(prefix: str, index: int, image: str) -> dict:
    """One record as RadVLM's builder for ``prefix`` writes it."""
    rid = f"{prefix}_{index}"
    if prefix.startswith(("mimic-train", "chexpertplus", "mimic-test")) and "labels" not in prefix:
        conv = turn(REPORT_Q, "Heart size is normal. No pleural effusion or pneumothorax.")
        return {"id": rid, "image": image, "conversations": conv}
    if prefix.startswith(("mimic-labels", "chexpert-")):
        conv = turn("<image>\nWhich abnormalities are visible on this Chest X-ray?", "Cardiomegaly, Edema")
        return {"id": rid, "image": image, "conversations": conv, "labels": ["Cardiomegaly", "Edema"],
                "pathologies": ["Atelectasis", "Cardiomegaly", "Edema", "Pleural Effusion"]}
    if prefix.startswith("chestima"):
        conv = turn("<image>\nWhere is the right lung on this Chest X-ray?",
                    "The right lung is located at the coordinates [0.12, 0.2, 0.48, 0.81] on the image.")
        return {"id": rid, "image": image, "conversations": conv}
    if prefix.startswith("vindr-cxr-mono"):
        conv = turn("<image>\nWhere is the Nodule/Mass located on this Chest X-ray?",
                    "The Nodule/Mass is located at the coordinates [0.61, 0.33, 0.7, 0.41] on the image.")
        return {"id": rid, "image": image, "conversations": conv, "labels": ["Nodule/Mass"]}
    if prefix.startswith("vindr-cxr"):
        answer = NO_FINDING if index % 2 else (
            "Cardiomegaly is located at [0.35, 0.5, 0.8, 0.75] and Pleural effusion at [0.1, 0.7, 0.3, 0.9].")
        conv = turn("<image>\nDetect all abnormalities on this Chest X-ray.", answer)
        return {"id": rid, "image": image, "conversations": conv, "labels": []}
    if prefix.startswith(("mscxr", "padchest")):
        conv = turn("<image>\nLocate the following phrase: small left pleural effusion.",
                    "This phrase can be observed at [0.55, 0.62, 0.9, 0.88] on the image.")
        return {"id": rid, "image": image, "conversations": conv}
    if prefix.startswith("conv-grounded"):
        conv = (turn("<image>\nIs there an effusion?", "Yes, a small left effusion.")
                + turn("Where is it?", "It can be observed at [0.55, 0.62, 0.9, 0.88] on the image."))
        return {"id": rid, "image": image, "conversations": conv}
    if prefix.startswith("conv"):
        conv = (turn("<image>\nWhat does this X-ray show?", "Mild cardiomegaly.")
                + turn("Is there a pneumothorax?", "No, there is no pneumothorax."))
        return {"id": rid, "image": image, "conversations": conv}
    raise AssertionError(prefix)


#: every RadVLM id prefix (train and test splits) → the task it must load as
PREFIXES = {
    "mimic-train": "report_generation", "chexpertplus-train": "report_generation", "mimic-test": "report_generation",
    "mimic-labels-train": "abnormality_classification", "chexpert-train": "abnormality_classification",
    "mimic-labels-test": "abnormality_classification",
    "chestima-train": "region_grounding", "chestima-test": "region_grounding",
    "vindr-cxr-mono-train1": "abnormality_grounding", "vindr-cxr-mono-test1": "abnormality_grounding",
    "vindr-cxr-train1": "abnormality_detection", "vindr-cxr-train2": "abnormality_detection",
    "vindr-cxr-test1": "abnormality_detection",
    **{f"mscxr-train{k}": "phrase_grounding" for k in (1, 2, 3)},
    **{f"padchest-train{k}": "phrase_grounding" for k in (1, 2)},
    "mscxr-test1": "phrase_grounding",
    "conv-train": "conversation",
    **{f"conv-grounded-train{k}": "grounded_conversation" for k in (1, 2, 3, 4)},
    **{f"conv-grounded-padchest-train{k}": "grounded_conversation" for k in (1, 2, 3, 4)},
}


def build(folder: Path, per_prefix: int = 2, name: str = "radvlm.json", absolute: bool = False) -> Path:
    records = []
    for prefix in PREFIXES:
        for i in range(per_prefix):
            image = f"images/{prefix}/{i}.png"
            records.append(radvlm_record(prefix, i, str(folder / image) if absolute else image))
    if absolute:  # write_records writes images relative to the folder: make them first
        write_records(folder, [dict(r, image=str(Path(r["image"]).relative_to(folder))) for r in records], "tmp.json")
    path = write_records(folder, records, name)
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("prefix", sorted(PREFIXES))
def test_task_from_each_radvlm_id_prefix(prefix):
    assert task_from_id(f"{prefix}_0") == PREFIXES[prefix]
    assert task_from_id(f"{prefix}_123456") == PREFIXES[prefix]


def test_unknown_or_malformed_ids_have_no_task():
    for rid in ("r1", "mimic_3", "mimic-train", "unknown-train_3", "mimic-train_x", "phantom-00001-report"):
        assert task_from_id(rid) is None, rid


def test_the_task_table_is_consistent():
    assert set(RADVLM_EVAL_TASKS) <= set(TASKS) and set(ID_SOURCES.values()) <= set(TASKS)
    assert BOX_TASKS == ("abnormality_grounding", "abnormality_detection", "region_grounding", "phrase_grounding")
    assert all(is_box_task(t) for t in BOX_TASKS) and not is_box_task("report_generation")
    assert canonical_task("anatomical_grounding") == "region_grounding"
    assert canonical_task("classification") == "abnormality_classification"
    assert task_kind("anatomical_grounding") == "grounding" and task_kind(None) is None
    with pytest.raises(ValueError, match="unknown task 'reports'"):
        canonical_task("reports")


@pytest.mark.parametrize("name,absolute", [("radvlm.json", False), ("radvlm.jsonl", False), ("abs.json", True)])
def test_radvlm_records_load_with_their_task(tmp_path, name, absolute):
    path = build(tmp_path, name=name, absolute=absolute)
    records = load_records(path)
    assert len(records) == 2 * len(PREFIXES)
    for r in records:
        assert r.task == PREFIXES[r.id.rsplit("_", 1)[0]], r.id
        assert r.image is not None and r.image.is_file()


def test_image_root_resolves_radvlm_relative_paths(tmp_path):
    build(tmp_path / "data")
    records = [radvlm_record("vindr-cxr-mono-train1", 0, "images/vindr-cxr-mono-train1/0.png")]
    listing = tmp_path / "lists" / "grounding.json"
    listing.parent.mkdir()
    listing.write_text(json.dumps(records))
    loaded = load_records(listing, image_root=tmp_path / "data")
    assert loaded[0].task == "abnormality_grounding" and loaded[0].image.is_file()


def test_an_explicit_task_key_wins_and_aliases_become_canonical(tmp_path):
    rec = radvlm_record("mimic-train", 0, "a.png")
    records = [dict(rec, task="conversation"), dict(rec, id="x_1", task="anatomical_grounding")]
    loaded = load_records(write_records(tmp_path, records))
    assert [r.task for r in loaded] == ["conversation", "region_grounding"]
    with pytest.raises(RecordError, match=r"record 0 \(id 'mimic-train_0'\).*unknown task 'report'"):
        load_records(write_records(tmp_path, [dict(rec, task="report")], "bad.json"))


def test_datamodule_filters_radvlm_records_by_task_and_reports_untasked(tmp_path, tiny_ckpt, caplog):
    path = build(tmp_path)
    extra = [radvlm_record("mimic-train", 9, "images/x.png")]
    extra[0]["id"] = "somebody-else_9"  # not a RadVLM prefix: untasked
    other = write_records(tmp_path, extra, "other.json")
    data = RadVLMDataModule(str(tiny_ckpt), train_files=[str(path), str(other)],
                            tasks=["abnormality_grounding", "abnormality_detection", "anatomical_grounding"],
                            task_weights={"anatomical_grounding": 2.0}, collator=PromptCollator)
    with caplog.at_level("WARNING"):
        data.setup("fit")
    tasks = [r.task for r in data.splits["train"]]
    assert tasks.count("abnormality_grounding") == 4 and tasks.count("abnormality_detection") == 6
    assert tasks.count("region_grounding") == 2 * 4  # weight 2 (given by its alias)
    assert data.untasked["train"] == 1
    assert "somebody-else_9" in caplog.text and "have no task" in caplog.text


def test_a_task_filter_that_keeps_nothing_is_an_error(tmp_path, tiny_ckpt):
    path = write_records(tmp_path, [radvlm_record("mimic-train", i, f"i{i}.png") for i in range(2)])
    data = RadVLMDataModule(str(tiny_ckpt), train_files=[str(path)], tasks=["phrase_grounding"])
    with pytest.raises(RecordError, match=r"keeps none of the 2 train records; their tasks: \{'report_generation'"):
        data.setup("fit")


def test_reward_terms_accept_aliases():
    from metrics.grounding import SoftF1

    term = RewardTerm(SoftF1(), tasks=["anatomical_grounding", "abnormality_detection"])
    assert term.tasks == ["region_grounding", "abnormality_detection"]
    assert term.applies("region_grounding") and term.applies("anatomical_grounding")
    assert not term.applies("phrase_grounding")


def test_the_grounding_grpo_config_runs_on_radvlm_records(tmp_path, tiny_ckpt):
    """The real grounding config (scaled to one CPU process) over RadVLM-built records: non-empty splits
    (grounding and detection records kept by their id prefix) and a GRPO step."""
    path = build(tmp_path)
    cli = main.main(args=[
        "fit", "--config", "configs/grpo_grounding.yaml",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
        "--trainer.strategy", "auto", "--trainer.max_steps", "1", "--trainer.max_epochs", "1",
        "--trainer.logger", "false", "--trainer.callbacks", "null", "--trainer.enable_progress_bar", "false",
        "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(tmp_path / "run"),
        "--model.init_args.policy.name_or_path", str(tiny_ckpt), "--model.init_args.policy.gradient_checkpointing",
        "false", "--model.init_args.policy.min_pixels", "1024", "--model.init_args.policy.max_pixels", "16384",
        "--model.init_args.max_new_tokens", "8", "--model.init_args.val_max_new_tokens", "8",
        "--model.init_args.export_dir", "null", "--model.init_args.micro_batch_size", "16",
        "--data.init_args.train_files", f"[{path}]", "--data.init_args.val_files", f"[{path}]",
        "--data.init_args.batch_size", "2", "--data.init_args.eval_batch_size", "2",
        "--data.init_args.num_workers", "0",
    ])
    data, trainer = cli.datamodule, cli.trainer
    kept = {r.task for r in data.splits["train"]}
    assert kept == {"abnormality_grounding", "abnormality_detection", "phrase_grounding", "region_grounding"}
    assert len(data.splits["train"]) == 2 * sum(is_box_task(t) for t in PREFIXES.values())
    assert trainer.global_step == 1
    assert float(trainer.callback_metrics["train/reward_unavailable_frac"]) == 0.0
