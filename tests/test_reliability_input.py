"""Bad input through ``RadVLMDataModule`` + collators: a clear error naming file / index / id / image path,
or a counted skip within ``max_bad_fraction``; never a crash deep inside the model.

Covered: malformed, truncated and bad-line JSON/JSONL files; wrong roles; missing, undecodable, truncated
PNG/JPEG images; images below 28 px a side or with an aspect ratio over 200 (which the Qwen image processor
would refuse with its own ValueError); over-long samples (dropped and counted, or ``SampleTooLongError``);
a record whose text holds ``<|image_pad|>``. For varied image sizes the number of image pad tokens in every
collated batch equals the number of merged vision features, and the model runs on the batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.collate import PromptCollator, SampleTooLongError, SFTCollator
from datamodules.datamodule import RadVLMDataModule
from datamodules.records import ImageError, RecordError
from lightning_modules.grpo import GRPOModule
from metrics.text import GLEU
from radvlm.policy import Policy, PolicyConfig
from radvlm.rewards import RewardTerm
from tests.helpers import report_record, write_records


@pytest.fixture(scope="module")
def policy(tiny_ckpt) -> Policy:
    return Policy.from_pretrained(tiny_ckpt, dtype="float32")


def save_image(path: Path, width: int, height: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.random.default_rng(seed).random((height, width)) * 255).astype("uint8")
    Image.fromarray(pixels).save(path)


def setup_data(tiny_ckpt, files: list[Path], **kw) -> RadVLMDataModule:
    data = RadVLMDataModule(str(tiny_ckpt), train_files=[str(f) for f in files], **kw)
    data.setup("fit")
    return data


def all_batches(data: RadVLMDataModule) -> list[dict]:
    return list(data.train_dataloader())


# ---------------------------------------------------------------------------------------- record files
def test_malformed_json_names_the_file(tiny_ckpt, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": "r0", "conversations": [}]')
    with pytest.raises(RecordError, match=r"bad\.json: invalid or truncated JSON at line 1, column 33 "
                                          r"\(char 32\)"):
        setup_data(tiny_ckpt, [bad])


def test_truncated_json_names_the_file_and_position(tiny_ckpt, tmp_path):
    full = write_records(tmp_path, [report_record(i) for i in range(3)], name="full.json")
    text = full.read_text()
    cut = tmp_path / "cut.json"
    cut.write_text(text[: len(text) // 2])  # a copy that stopped half way
    with pytest.raises(RecordError, match=r"cut\.json: invalid or truncated JSON at line 1") as err:
        setup_data(tiny_ckpt, [full, cut])
    assert err.value.file == str(cut)


def test_bad_jsonl_line_names_file_line_and_index(tiny_ckpt, tmp_path):
    write_records(tmp_path, [report_record(0), report_record(1)])  # writes the images
    lines = [json.dumps(report_record(0)), json.dumps(report_record(1))[:-5]]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordError, match=r"data\.jsonl: record 1: invalid JSON on line 2"):
        setup_data(tiny_ckpt, [path])


@pytest.mark.parametrize("turns, why", [
    ([("human", "<image>\nWrite a report."), ("human", "Again.")], "must alternate"),
    ([("system", "<image>\nYou are a radiologist."), ("gpt", "Ok.")], "has role 'system'"),
    ([("human", "<image>\nWrite a report.")], "must end with a gpt"),
])
def test_record_with_wrong_roles_names_file_index_and_id(tiny_ckpt, tmp_path, turns, why):
    records = [report_record(i) for i in range(3)]
    records[2]["conversations"] = [{"from": f, "value": v} for f, v in turns]
    path = write_records(tmp_path, records)
    with pytest.raises(RecordError, match=why) as err:
        setup_data(tiny_ckpt, [path])
    assert (err.value.file, err.value.index, err.value.record_id) == (str(path), 2, "r2")
    assert "data.json: record 2 (id 'r2')" in str(err.value)


# ---------------------------------------------------------------------------------------------- images
def corrupt(path: Path, kind: str) -> None:
    if kind == "missing":
        path.unlink()
    elif kind == "not an image":
        path.write_bytes(b"GIF89a? no, just text")
    elif kind == "truncated png":
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "truncated jpeg":  # PIL's verify() accepts it; only a full decode notices
        save_image(path.with_suffix(".tmp.jpg"), 64, 64)
        path.write_bytes(path.with_suffix(".tmp.jpg").read_bytes()[:400])
    elif kind == "too small":
        save_image(path, 20, 20)
    elif kind == "aspect ratio 203":
        save_image(path, 6100, 30)


BAD_IMAGES = ["missing", "not an image", "truncated png", "truncated jpeg", "too small", "aspect ratio 203"]
REASONS = {"missing": "file not found", "not an image": "cannot be decoded",
           "truncated png": "cannot be decoded", "truncated jpeg": "cannot be decoded",
           "too small": "below the minimum side of 28 px",
           "aspect ratio 203": "aspect ratio 203.3 of size 6100x30 exceeds 200"}


@pytest.mark.parametrize("kind", BAD_IMAGES)
def test_bad_image_at_setup_names_file_index_id_and_path(tiny_ckpt, tmp_path, kind):
    path = write_records(tmp_path, [report_record(i) for i in range(4)])
    image = tmp_path / "img" / "3.png"
    corrupt(image, kind)
    with pytest.raises(RecordError, match=REASONS[kind]) as err:
        setup_data(tiny_ckpt, [path])
    assert (err.value.file, err.value.index, err.value.record_id) == (str(path), 3, "r3")
    assert str(image) in str(err.value)


@pytest.mark.parametrize("kind", BAD_IMAGES)
def test_bad_image_found_at_collate_time_is_an_image_error_naming_path_and_record(tiny_ckpt, tmp_path, kind):
    # check_images=False (as for a million-image run): the problem surfaces when the batch is built
    path = write_records(tmp_path, [report_record(0)])
    image = tmp_path / "img" / "0.png"
    corrupt(image, kind)
    data = setup_data(tiny_ckpt, [path], check_images=False, batch_size=1)
    with pytest.raises(ImageError, match=REASONS[kind]) as err:
        all_batches(data)
    assert err.value.path == str(image) and "record 'r0'" in str(err.value) and "index 0" in str(err.value)


def test_qwen_processor_itself_would_refuse_the_extreme_aspect_ratio(tiny_ckpt, tmp_path):
    # why the check above exists: without it the error would come from transformers, naming nothing
    data = setup_data(tiny_ckpt, [write_records(tmp_path, [report_record(0)])])
    wide = Image.fromarray(np.zeros((30, 6100), dtype="uint8")).convert("RGB")
    with pytest.raises(ValueError, match="aspect ratio"):
        data.processor.image_processor(images=[wide], return_tensors="pt")


def test_bad_images_are_skipped_and_counted_within_max_bad_fraction(tiny_ckpt, tmp_path):
    path = write_records(tmp_path, [report_record(i) for i in range(10)])
    corrupt(tmp_path / "img" / "2.png", "missing")
    corrupt(tmp_path / "img" / "7.png", "truncated jpeg")
    data = setup_data(tiny_ckpt, [path], max_bad_fraction=0.2, batch_size=4)  # 2 / 10 = 0.2: allowed
    assert data.n_bad == 2
    seen = sorted(i for batch in all_batches(data) for i in batch["ids"])
    assert seen == sorted(f"r{i}" for i in range(10) if i not in (2, 7))


def test_too_many_bad_images_stop_setup_listing_them(tiny_ckpt, tmp_path):
    path = write_records(tmp_path, [report_record(i) for i in range(10)])
    corrupt(tmp_path / "img" / "2.png", "missing")
    corrupt(tmp_path / "img" / "7.png", "not an image")
    with pytest.raises(RecordError, match=r"2 of 10 train records have a bad image, more than "
                                          r"max_bad_fraction=0\.1") as err:
        setup_data(tiny_ckpt, [path], max_bad_fraction=0.1)
    assert "id='r2'" in str(err.value) and "id='r7'" in str(err.value)
    assert str(tmp_path / "img" / "7.png") in str(err.value)


# ------------------------------------------------------------------------------------------ long samples
def long_record(i: int) -> dict:
    return report_record(i, "The lungs are clear. " * 60)  # ≈ 300+ tokens of answer


def test_over_long_samples_are_dropped_and_counted_never_cut(tiny_ckpt, tmp_path, policy):
    path = write_records(tmp_path, [report_record(0), long_record(1), report_record(2), long_record(3)])
    data = setup_data(tiny_ckpt, [path], max_length=120, batch_size=4)
    (batch,) = all_batches(data)
    assert batch["n_dropped"] == 2 and sorted(batch["ids"]) == ["r0", "r2"]
    assert batch["input_ids"].shape[1] <= 120
    image_id = data.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((batch["input_ids"] == image_id).sum()) == int(batch["image_grid_thw"].prod(-1).sum()) // 4
    loss, n = policy.sft_loss(batch)
    assert torch.isfinite(loss) and n > 0


def test_batch_of_only_over_long_samples_is_empty_not_a_crash(tiny_ckpt, tmp_path):
    path = write_records(tmp_path, [long_record(0), long_record(1)])
    (batch,) = all_batches(setup_data(tiny_ckpt, [path], max_length=120, batch_size=2))
    assert batch == {"n_dropped": 2, "empty": True}


def test_over_long_sample_with_overlong_error_names_record(tiny_ckpt, tmp_path):
    path = write_records(tmp_path, [report_record(0), long_record(1)])
    data = setup_data(tiny_ckpt, [path], max_length=120, overlong="error", batch_size=2)
    with pytest.raises(SampleTooLongError, match=r"record 'r1' \(.*data\.json, index 1\) has \d+ tokens > "
                                                 r"max_length=120"):
        all_batches(data)


def test_grpo_counts_dropped_over_long_prompts_and_trains_on_the_rest(tiny_ckpt, tmp_path):
    long_prompt = report_record(1)
    long_prompt["conversations"][0]["value"] = "<image>\n" + "Describe every rib in detail. " * 40
    path = write_records(tmp_path, [report_record(0), long_prompt])
    L.seed_everything(0)
    module = GRPOModule(PolicyConfig(str(tiny_ckpt), dtype="float32"), rewards=[RewardTerm(GLEU())],
                        num_generations=2, max_new_tokens=4, beta=0.0)
    data = RadVLMDataModule(str(tiny_ckpt), train_files=[str(path)], collator=PromptCollator, batch_size=2,
                            max_length=100)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0)
    trainer.fit(module, data)
    assert trainer.global_step == 1
    assert trainer.callback_metrics["train/dropped_samples"].item() == 1.0


def test_text_holding_an_image_pad_token_is_a_clear_record_error(tiny_ckpt, tmp_path):
    # "<|image_pad|>" in the answer would add one image token without a vision feature: the model would fail
    # with "Image features and image tokens do not match". Refused when the file is read (setup), not mid-run;
    # the collator checks it again for records built without load_records.
    records = [report_record(0), report_record(1, "Normal heart. <|image_pad|>")]
    with pytest.raises(RecordError, match=r"record 1 \(id 'r1'\): turn 1 \(gpt\) holds the model's special token "
                                          r"'<\|image_pad\|>'"):
        setup_data(tiny_ckpt, [write_records(tmp_path, records)], batch_size=2)


# ------------------------------------------------------------------------------ image tokens vs features
SIZES = [(64, 64), (100, 300), (512, 80), (28, 28), (30, 5000), (1000, 700)]  # (width, height)


@pytest.mark.parametrize("pixels", [None, (1024, 128 * 128)], ids=["tiny-default", "min1024-max16384"])
@pytest.mark.parametrize("collator", [SFTCollator, PromptCollator], ids=["sft", "prompt"])
def test_image_pad_tokens_equal_vision_features_for_varied_sizes(tiny_ckpt, tmp_path, policy, collator,
                                                                  pixels):
    for i, (w, h) in enumerate(SIZES):
        save_image(tmp_path / "img" / f"{i}.png", w, h, seed=i)
    path = write_records(tmp_path, [report_record(i) for i in range(len(SIZES))])
    min_pixels, max_pixels = pixels or (None, None)
    data = setup_data(tiny_ckpt, [path], collator=collator, batch_size=3, min_pixels=min_pixels,
                      max_pixels=max_pixels)
    image_id = data.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    merge = data.processor.image_processor.merge_size
    grids = []
    for batch in all_batches(data):
        grid = batch["image_grid_thw"]  # (3, 3)
        pads = (batch["input_ids"] == image_id) & (batch["attention_mask"] == 1)  # (3, T)
        assert int(pads.sum()) == int(grid.prod(-1).sum()) // merge**2  # whole batch
        assert pads.sum(-1).tolist() == (grid.prod(-1) // merge**2).tolist()  # and row by row
        assert torch.equal(batch["mm_token_type_ids"].bool(), pads)
        assert batch["pixel_values"].shape[0] == int(grid.prod(-1).sum())
        grids.extend(grid.tolist())
        with torch.no_grad():
            if collator is SFTCollator:
                loss, n = policy.sft_loss(batch)
                assert torch.isfinite(loss) and n > 0
            else:
                out = policy.generate(batch, max_new_tokens=2)
                assert len(out.texts) == 3
    assert len(grids) == len(SIZES) and len({tuple(g) for g in grids}) >= 4  # the sizes really differ
