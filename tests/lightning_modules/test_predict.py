import json
from collections import Counter

import lightning as L
import numpy as np
import pytest
import yaml
from lightning.pytorch.loggers import TensorBoardLogger

import main
from datamodules.collate import PromptCollator
from datamodules.datamodule import RadVLMDataModule
from lightning_modules.callbacks import BoxPictures, PredictionWriter, repair_tail
from lightning_modules.grpo import GRPOModule
from metrics.grounding import SoftF1
from radvlm.policy import PolicyConfig
from radvlm.rewards import RewardTerm
from radvlm_tools.draw import GT_COLOUR
from radvlm_tools.prediction_files import (
    HEADER_KEY,
    PredictionFileMismatch,
    is_header,
    read_prediction_file,
    resume_problem,
)

TASKS = ("report_generation", "abnormality_grounding")


def predict(tiny_ckpt, phantom_dir, out, tmp_path, *extra):
    main.main(args=[
        "predict", "--config", "configs/demo/predict.yaml",
        "--model.init_args.policy.name_or_path", str(tiny_ckpt),
        "--model.init_args.max_new_tokens", "4",
        "--data.init_args.phantom_dir", str(phantom_dir),
        "--data.init_args.eval_batch_size", "2",
        "--trainer.callbacks.init_args.output", str(out),
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
        *extra,
    ])


def ids_of(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert is_header(rows[0]) and not any(is_header(r) for r in rows[1:])  # one header, first
    return [r["id"] for r in rows[1:]]


def test_interrupted_predict_resumes_without_duplicates(tiny_ckpt, phantom_dir, tmp_path):
    expected = {r["id"] for r in json.loads((phantom_dir / "test.json").read_text()) if r["task"] in TASKS}
    assert len(expected) > 4
    out = tmp_path / "preds" / "tiny.jsonl"
    predict(tiny_ckpt, phantom_dir, out, tmp_path, "--trainer.limit_predict_batches", "2")  # "interrupted"
    first = ids_of(out)
    assert len(first) == 4 and set(first) <= expected  # 2 batches of 2
    with out.open("a") as f:  # a crash in the middle of a write leaves a torn last line
        f.write('{"id": "phantom-torn", "task": "repo')
    predict(tiny_ckpt, phantom_dir, out, tmp_path)
    ids = ids_of(out)  # every line parses: the torn one was cut off
    assert ids[:4] == first
    assert not [i for i, c in Counter(ids).items() if c > 1]
    assert set(ids) == expected
    row = json.loads(out.read_text().splitlines()[-1])
    assert {"id", "task", "prompt", "completion", "answer", "reference", "gt_boxes", "completion_tokens",
            "truncated"} <= set(row)
    assert 1 <= row["completion_tokens"] <= 4
    predict(tiny_ckpt, phantom_dir, out, tmp_path)  # nothing left: nothing written
    assert ids_of(out) == ids


def test_predict_file_header_names_the_model_and_readers_skip_it(tiny_ckpt, phantom_dir, tmp_path):
    out = tmp_path / "preds" / "tiny.jsonl"
    predict(tiny_ckpt, phantom_dir, out, tmp_path, "--trainer.limit_predict_batches", "1")
    header = json.loads(out.read_text().splitlines()[0])[HEADER_KEY]
    assert header["module"] == "lightning_modules.sft.SFTModule"
    assert header["name_or_path"] == str(tiny_ckpt.resolve())
    assert header["checkpoint"] is None and len(header["weights"]) == 16 and len(header["fingerprint"]) == 16
    assert header["settings"]["max_new_tokens"] == 4
    read = read_prediction_file(out)
    assert len(read.rows) == 2 and read.header == header  # 1 batch of 2 rows; the header is no row
    assert "tiny" in read.describe() and header["fingerprint"] in read.describe()


def test_predict_resume_for_another_model_is_refused(tiny_ckpt, phantom_dir, tmp_path):
    import shutil

    out = tmp_path / "preds" / "tiny.jsonl"
    predict(tiny_ckpt, phantom_dir, out, tmp_path, "--trainer.limit_predict_batches", "1")
    before = out.read_text()
    other = tmp_path / "other_model"  # the same weights under another name: another model for the file
    shutil.copytree(tiny_ckpt, other)
    with pytest.raises(PredictionFileMismatch, match="name_or_path.*other_model.*resume false"):
        predict(other, phantom_dir, out, tmp_path)
    with pytest.raises(PredictionFileMismatch, match=r"settings \(fingerprint .*max_new_tokens: 4 → 5"):
        predict(tiny_ckpt, phantom_dir, out, tmp_path, "--model.init_args.max_new_tokens", "5")
    assert out.read_text() == before  # nothing appended
    rc = main.run(["predict", "--config", "configs/demo/predict.yaml", "--model.init_args.policy.name_or_path",
                   str(other), "--data.init_args.phantom_dir", str(phantom_dir), "--trainer.callbacks.init_args.output",
                   str(out), "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])
    assert rc == 2  # a one-line user error
    predict(other, phantom_dir, out, tmp_path, "--trainer.limit_predict_batches", "1",
            "--trainer.callbacks.init_args.resume", "false")  # afresh: the other model's header
    assert json.loads(out.read_text().splitlines()[0])[HEADER_KEY]["name_or_path"] == str(other.resolve())


def test_resume_refuses_a_file_without_header_or_of_another_checkpoint(tmp_path):
    from radvlm_tools.prediction_files import CHECKPOINT_KEYS, header_line, model_identity

    old = tmp_path / "old.jsonl"
    old.write_text('{"id": "a", "task": "report_generation", "answer": "x", "reference": "y"}\n')
    me = model_identity("m.M", "hub/model", None, {"max_new_tokens": 4})
    assert "does not name the model" in resume_problem(old, me)
    assert resume_problem(tmp_path / "missing.jsonl", me) is None
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"12345")
    first = tmp_path / "first.jsonl"
    first.write_text(header_line(model_identity("m.M", "hub/model", str(ckpt), {"max_new_tokens": 4}))
                     + '{"id": "a", "task": "report_generation", "answer": "x", "reference": "y"}\n')
    assert resume_problem(first, me, CHECKPOINT_KEYS).startswith(f"{first} was written by another model")
    assert "checkpoint: " in resume_problem(first, me, CHECKPOINT_KEYS)
    same = model_identity("m.M", "hub/model", str(ckpt), {"max_new_tokens": 4})
    assert resume_problem(first, same) is None
    # an object without a repr of its own: its address differs each run, the fingerprint does not
    first_run = model_identity("m.M", "hub/model", None, {"engine": "<radvlm.rollout.HFEngine object at 0x7f01>"})
    second_run = model_identity("m.M", "hub/model", None, {"engine": "<radvlm.rollout.HFEngine object at 0x7e99>"})
    assert first_run["fingerprint"] == second_run["fingerprint"]
    ckpt.write_bytes(b"123456")  # the same path, trained on: another checkpoint
    grown = model_identity("m.M", "hub/model", str(ckpt), {"max_new_tokens": 4})
    assert "checkpoint_weights" in resume_problem(first, grown)


def test_repair_tail_cuts_only_an_unterminated_last_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n')
    assert not repair_tail(path) and path.read_text() == '{"id": "a"}\n{"id": "b"}\n'
    path.write_text('{"id": "a"}\n{"id": "b')
    assert repair_tail(path) and path.read_text() == '{"id": "a"}\n'


def test_prediction_writer_fills_a_missing_task(tmp_path):
    writer = PredictionWriter(str(tmp_path / "p.jsonl"), default_task="phrase_grounding")

    class Trainer:
        world_size, global_rank = 1, 0

    writer.write_on_batch_end(Trainer(), None, [{"id": "a", "task": None}, {"id": "b", "task": "report_generation"}],
                              None, None, 0)
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["task"] for r in rows] == ["phrase_grounding", "report_generation"]


@pytest.mark.parametrize("name", ["mimic_reports", "chest_imagenome", "vindr", "ms_cxr"])
def test_eval_configs_parse_as_greedy_bf16_gpu_predictions_of_the_grpo_export(name, capsys):
    with pytest.raises(SystemExit) as stop:
        main.main(args=["predict", "--config", f"configs/eval_{name}.yaml", "--print_config"])
    assert stop.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["trainer"]["accelerator"] == "gpu" and cfg["trainer"]["precision"] == "bf16-true"
    (writer,) = cfg["trainer"]["callbacks"]
    assert writer["class_path"] == "lightning_modules.callbacks.PredictionWriter"
    assert writer["init_args"]["resume"] is True and writer["init_args"]["default_task"]
    policy = cfg["model"]["init_args"]["policy"]
    assert policy["name_or_path"].startswith("runs/grpo_") and policy["name_or_path"].endswith("/hf_export")
    assert policy["dtype"] == "bfloat16"
    assert cfg["data"]["init_args"]["predict_files"]


@pytest.fixture(scope="module")
def grpo_validation(tiny_ckpt, phantom_dir):
    def run(tmp_path, log_text_samples):
        L.seed_everything(0)
        module = GRPOModule(PolicyConfig(str(tiny_ckpt), dtype="float32"),
                            rewards=[RewardTerm(SoftF1(), tasks=["abnormality_grounding"])],
                            num_generations=2, max_new_tokens=4, log_text_samples=log_text_samples)
        split = str(phantom_dir / "test.json")
        data = RadVLMDataModule(str(tiny_ckpt), val_files=[split], test_files=[split], collator=PromptCollator,
                                tasks=["abnormality_grounding", "report_generation"], eval_batch_size=4,
                                max_val_samples=6)
        logger = TensorBoardLogger(str(tmp_path), name="tb")
        images = []
        logger.experiment.add_image = lambda tag, img, global_step=None, dataformats="CHW": images.append(
            (tag, img, dataformats))
        pictures = BoxPictures(num_images=3, size=64)
        trainer = L.Trainer(accelerator="cpu", logger=logger, callbacks=[pictures], enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=2, limit_test_batches=2)
        trainer.validate(module, data)
        validated = list(pictures.samples)
        trainer.test(module, data)
        return module, images, validated, pictures.samples

    return run


def test_box_pictures_logs_a_grid_of_grounding_samples(grpo_validation, tmp_path):
    module, images, validated, tested = grpo_validation(tmp_path, log_text_samples=True)
    # the callback keeps the samples the steps return (on_*_batch_end outputs): the module holds none of them
    assert not any(name.startswith("_val_pictures") for name in vars(module))
    assert len(validated) == 3  # capped at num_images
    assert all(p["task"] == "abnormality_grounding" for p in validated)
    assert {"image", "answer", "gt_boxes", "prompt", "task", "reference"} <= set(validated[0])
    assert [p["image"] for p in tested] == [p["image"] for p in validated]  # test_step returns the same
    (tag, grid, fmt), (test_tag, _, _) = images
    assert tag == "val/pictures" and test_tag == "test/pictures"
    assert fmt == "HWC" and grid.dtype == np.uint8 and grid.shape[2] == 3
    green = (grid == np.array(GT_COLOUR, dtype=np.uint8)).all(axis=-1)
    assert green.sum() > 20  # ground-truth box edges
    _, plain, _, _ = grpo_validation(tmp_path / "no_text", log_text_samples=False)
    assert plain[0][1].shape[0] < grid.shape[0]  # no caption band when text logging is off


def test_box_pictures_keeps_the_first_box_samples_of_each_epoch():
    pictures = BoxPictures(num_images=2)
    box = {"image": "a.png", "answer": "[0, 0, 1, 1]", "gt_boxes": [], "prompt": "p", "task": "phrase_grounding",
           "reference": "r"}
    report = {**box, "task": "report_generation"}
    pictures.on_validation_epoch_start(None, None)
    pictures.on_validation_batch_end(None, None, None, {}, 0)  # a step that returned nothing
    pictures.on_validation_batch_end(None, None, {"samples": [report, box]}, {}, 1)
    pictures.on_validation_batch_end(None, None, {"samples": [{**box, "image": "b.png"}, {**box, "image": "c.png"}]},
                                     {}, 2)
    assert [s["image"] for s in pictures.samples] == ["a.png", "b.png"]  # box tasks only, first num_images
    pictures.on_test_epoch_start(None, None)
    assert pictures.samples == []
    pictures.on_test_batch_end(None, None, {"samples": [{**box, "image": "d.png"}]}, {}, 0)
    assert [s["image"] for s in pictures.samples] == ["d.png"]
