import json

import numpy as np
import pytest
from PIL import Image

from datamodules.records import load_records, save_records
from datamodules.shuffle import derangement, shuffle_images
from radvlm_tools.shuffle_control import (
    format_rows,
    image_dependence,
    main,
    paired_difference,
    paired_gain,
    write_shuffled_records,
)

BOX_A = "[0.1, 0.1, 0.5, 0.5]"
BOX_B = "[0.6, 0.6, 0.9, 0.9]"


@pytest.mark.parametrize("n", [2, 3, 5, 17, 200])
def test_derangement_is_a_permutation_without_fixed_point(n):
    for seed in range(20):
        perm = derangement(n, seed)
        assert sorted(perm.tolist()) == list(range(n))
        assert not np.any(perm == np.arange(n)), (n, seed)


def test_derangement_is_fixed_by_its_seed_and_needs_two_elements():
    assert derangement(50, 3).tolist() == derangement(50, 3).tolist()
    assert derangement(50, 3).tolist() != derangement(50, 4).tolist()
    assert derangement(2, 0).tolist() == [1, 0]  # the only derangement of two
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1, 0)


def write_dataset(tmp_path, n_images=4, tasks=("abnormality_grounding", "report_generation")):
    (tmp_path / "images").mkdir()
    records = []
    for i in range(n_images):
        Image.new("L", (32, 32), 40 * i).save(tmp_path / "images" / f"im{i}.png")
        for task in tasks:
            answer = f"The mass is located at the coordinates {BOX_A} on the image." if task != "report_generation" \
                else "No finding."
            records.append({"id": f"im{i}-{task}", "image": f"images/im{i}.png", "task": task,
                            "conversations": [{"from": "human", "value": "<image>\nWhere?"},
                                              {"from": "gpt", "value": answer}]})
    return save_records(records, tmp_path / "test.json")


def test_images_are_deranged_by_image_not_by_record(tmp_path):
    # two records (tasks) per image: a record derangement could give a record its own image back through the
    # other task's record; an image derangement never does
    records = load_records(write_dataset(tmp_path), check_images=False)
    shuffled = shuffle_images(records, seed=0)
    assert [r.id for r in shuffled] == [r.id for r in records]
    assert [r.conversations for r in shuffled] == [r.conversations for r in records]
    for before, after in zip(records, shuffled):
        assert after.image != before.image and after.extra["own_image"] == str(before.image)
    # both records of one image get the same other image
    by_image = {}
    for before, after in zip(records, shuffled):
        by_image.setdefault(before.image, set()).add(after.image)
    assert all(len(v) == 1 for v in by_image.values())
    assert sorted(str(p) for v in by_image.values() for p in v) == sorted(str(p) for p in by_image)


def test_shuffled_record_file_loads_and_keeps_the_chosen_tasks(tmp_path):
    src = write_dataset(tmp_path)
    dst = write_shuffled_records(src, tmp_path / "out" / "shuffled.json", seed=1, tasks=["abnormality_grounding"])
    loaded = load_records(dst)  # absolute image paths: loads from any folder, images checked
    assert [r.task for r in loaded] == ["abnormality_grounding"] * 4
    assert all(str(r.image) != r.extra["own_image"] for r in loaded)
    again = write_shuffled_records(src, tmp_path / "again.json", seed=1, tasks=["abnormality_grounding"])
    assert json.loads(again.read_text()) == json.loads(dst.read_text())


def test_paired_difference_mean_and_interval():
    # differences 1, 0, 0, 1 → mean 0.5; every resample mean lies in [0, 1]
    d = paired_difference([1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0], n_boot=500)
    assert d["delta"] == 0.5 and d["n"] == 4
    assert 0.0 <= d["ci95_low"] <= 0.5 <= d["ci95_high"] <= 1.0
    same = paired_difference([0.3, 0.7], [0.3, 0.7], n_boot=100)
    assert (same["delta"], same["ci95_low"], same["ci95_high"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="paired"):
        paired_difference([1.0, 2.0], [1.0])


def rows(answers, refs=(BOX_A, BOX_B, BOX_A)):
    return [{"id": f"s{i}", "task": "abnormality_grounding", "answer": f"at {a}", "reference": f"at {r}"}
            for i, (a, r) in enumerate(zip(answers, refs))] + [
        {"id": "r0", "task": "report_generation", "answer": "x", "reference": "y"}]  # not a box task: ignored


def test_image_dependence_is_own_minus_shuffled_per_record():
    own = rows([BOX_A, BOX_B, BOX_B])  # soft-F1 1, 1, 0 (disjoint boxes) → mean 2/3; AP 1, 1, 0
    shuffled = rows([BOX_A, BOX_A, BOX_A])  # 1, 0, 1 → mean 2/3: the prior (always BOX_A) is worth as much
    entry = image_dependence(own, list(reversed(shuffled)), n_boot=200)  # pairing is by id, not order
    assert entry["n"] == 3
    for key in ("soft_f1", "map"):
        assert entry[key]["own"] == pytest.approx(2 / 3) and entry[key]["shuffled"] == pytest.approx(2 / 3)
        assert entry[key]["image"] == pytest.approx(0.0)  # differences 0, +1, −1
        assert entry[key]["ci95_low"] < 0 < entry[key]["ci95_high"]
    assert entry["per_record"]["s1"]["soft_f1_image"] == 1.0
    assert entry["per_record"]["s2"]["map_image"] == -1.0
    assert "| m |" in format_rows({"m": entry})


def test_image_dependence_refuses_other_records():
    with pytest.raises(ValueError, match="same records"):
        image_dependence(rows([BOX_A, BOX_A, BOX_A]), rows([BOX_A, BOX_A]), n_boot=10)


def test_paired_gain_between_models():
    sft = image_dependence(rows([BOX_A, BOX_A, BOX_A]), rows([BOX_A, BOX_A, BOX_A]), n_boot=10)  # image 0
    grpo = image_dependence(rows([BOX_A, BOX_B, BOX_A]), rows([BOX_A, BOX_A, BOX_A]), n_boot=10)  # image 0, 1, 0
    gain = paired_gain(sft, grpo, "soft_f1_image", n_boot=200)
    assert gain["delta"] == pytest.approx(1 / 3) and gain["n"] == 3


def test_cli_permutes_and_scores(tmp_path, capsys):
    src = write_dataset(tmp_path, n_images=3, tasks=("abnormality_grounding",))
    main(["permute", str(src), str(tmp_path / "shuf.jsonl"), "--seed", "2"])
    assert len(load_records(tmp_path / "shuf.jsonl")) == 3
    own, shuf = tmp_path / "own.jsonl", tmp_path / "shuf_pred.jsonl"
    own.write_text("".join(json.dumps(r) + "\n" for r in rows([BOX_A, BOX_B, BOX_A])))
    shuf.write_text("".join(json.dumps(r) + "\n" for r in rows([BOX_B, BOX_B, BOX_B])))
    brief = main(["score", str(own), str(shuf), "--name", "sft", "--bootstrap", "50",
                  "--json", str(tmp_path / "s.json")])
    assert brief["soft_f1"]["own"] == 1.0 and brief["soft_f1"]["shuffled"] == pytest.approx(1 / 3)
    assert "| sft |" in capsys.readouterr().out
    assert json.loads((tmp_path / "s.json").read_text())["n"] == 3


def test_data_module_option_answers_test_and_predict_records_on_other_images(tmp_path, tiny_ckpt):
    from datamodules.datamodule import RadVLMDataModule

    src = write_dataset(tmp_path, n_images=5)
    files = [str(src)]
    plain = RadVLMDataModule(processor_path=str(tiny_ckpt), train_files=files, val_files=files, test_files=files,
                             predict_files=files)
    control = RadVLMDataModule(processor_path=str(tiny_ckpt), train_files=files, val_files=files,
                               test_files=files, predict_files=files, shuffle_images=4)
    plain.setup()
    control.setup()
    for split in ("train", "val"):  # training and validation never see the control
        assert [r.image for r in control.splits[split]] == [r.image for r in plain.splits[split]]
    for split in ("test", "predict"):
        before, after = plain.splits[split], control.splits[split]
        assert [r.id for r in after] == [r.id for r in before]  # same records, same order, same references
        assert [r.conversations for r in after] == [r.conversations for r in before]
        assert all(a.image != b.image for a, b in zip(after, before))  # no record keeps its image
        # the same permutation as the tool's (a derangement of the 5 images, seed 4)
        assert [r.image for r in after] == [r.image for r in shuffle_images(before, 4)]


def test_evaluate_reports_the_shuffle_control_per_model(tmp_path, capsys):
    from radvlm_tools.evaluate import main as evaluate

    own, shuf = tmp_path / "sft.jsonl", tmp_path / "sft_shuffled.jsonl"
    own.write_text("".join(json.dumps(r) + "\n" for r in rows([BOX_A, BOX_B, BOX_A])))  # soft-F1 1, 1, 1
    shuf.write_text("".join(json.dumps(r) + "\n" for r in rows([BOX_B, BOX_B, BOX_B])))  # 0, 1, 0
    out = evaluate([str(own), "--shuffled", str(shuf), "--bootstrap", "50", "--no-scored",
                    "--json", str(tmp_path / "e.json")])  # box rows only: no model-based metric is built
    control = out["shuffle_control"]
    assert control["n"] == 3 and "per_record" not in control
    assert control["soft_f1"]["own"] == 1.0 and control["soft_f1"]["shuffled"] == pytest.approx(1 / 3)
    assert control["soft_f1"]["image"] == pytest.approx(2 / 3)
    assert "Shuffle control" in capsys.readouterr().out
    assert json.loads((tmp_path / "e.json").read_text())["shuffle_control"]["map"]["own"] == 1.0
    with pytest.raises(SystemExit):  # one shuffled file per prediction file
        evaluate([str(own), str(own), "--shuffled", str(shuf), "--no-scored"])
