"""The ablation tool's pure parts: commands, the table (values by hand), the curves from TensorBoard, the PNG."""

import math

import pytest

from radvlm_tools import ablation

BOX_A = "[0.1, 0.1, 0.5, 0.5]"
BOX_B = "[0.6, 0.6, 0.9, 0.9]"


def rows(answers, refs=(BOX_A, BOX_B, BOX_A, BOX_B)):
    return [{"id": f"s{i}", "task": "abnormality_grounding", "answer": f"at {a}", "reference": f"at {r}"}
            for i, (a, r) in enumerate(zip(answers, refs))]


def test_an_unknown_variant_is_refused_with_the_known_ones():
    with pytest.raises(SystemExit, match=r"no variant 'ppo'.*known variants: .*grpo"):
        ablation.variant_config("ppo")


def test_fit_args_overlay_the_variant_and_give_it_its_own_folders(tmp_path):
    args = ablation.fit_args("configs/demo/grpo.yaml", "grpo", tmp_path, tmp_path / "sft", 7)
    assert args[:5] == ["fit", "--config", "configs/demo/grpo.yaml", "--config", "configs/demo/ablation/grpo.yaml"]
    pairs = dict(zip(args[5::2], args[6::2]))
    assert pairs["--trainer.default_root_dir"] == str(tmp_path / "grpo")
    assert pairs["--model.init_args.policy.name_or_path"] == str(tmp_path / "sft")
    assert pairs["--trainer.max_steps"] == "7"
    assert "--trainer.max_steps" not in ablation.fit_args("b.yaml", "grpo", tmp_path, tmp_path, None)


def test_predict_args_shuffle_only_for_the_control(tmp_path):
    own = ablation.predict_args(tmp_path / "m", tmp_path / "p.jsonl", shuffled=False)
    shuffled = ablation.predict_args(tmp_path / "m", tmp_path / "p.jsonl", shuffled=True)
    assert "--data.init_args.shuffle_images" not in own
    assert shuffled[-2:] == ["--data.init_args.shuffle_images", "0"]
    assert "[abnormality_grounding]" in own


def test_summary_and_table_by_hand():
    # reference variant: right on own images for records 0 and 1 only; wrong everywhere on shuffled images.
    # soft-F1 per record: own [1, 1, 0, 0] -> 0.5, shuffled [0, 0, 0, 0] -> 0, image-dependent +0.5
    # other variant: right on all own images, right on shuffled for records 0 and 2 (a prior: box A):
    # own 1.0, shuffled 0.5, image-dependent per record [0, 1, 0, 1] -> 0.5; minus the reference's [1, 1, 0, 0]
    # per record: [-1, 0, 0, 1] -> mean 0.0
    own = {"grpo": rows([BOX_A, BOX_B, BOX_B, BOX_A]), "gspo": rows([BOX_A, BOX_B, BOX_A, BOX_B])}
    shuffled = {"grpo": rows([BOX_B, BOX_A, BOX_B, BOX_A]), "gspo": rows([BOX_A, BOX_A, BOX_A, BOX_A])}
    summary = ablation.summarise(own, shuffled, {"grpo": 12.0, "gspo": 30.0}, reference="grpo", n_boot=200)
    g, s = summary["grpo"], summary["gspo"]
    assert (g["soft_f1"]["own"], g["soft_f1"]["shuffled"], g["soft_f1"]["image"]) == (0.5, 0.0, 0.5)
    assert (s["soft_f1"]["own"], s["soft_f1"]["shuffled"], s["soft_f1"]["image"]) == (1.0, 0.5, 0.5)
    assert "vs_reference" not in g
    assert s["vs_reference"]["soft_f1_image"]["delta"] == 0.0
    assert s["vs_reference"]["soft_f1_image"]["ci95_low"] < 0 < s["vs_reference"]["soft_f1_image"]["ci95_high"]
    assert g["answer_chars"] == len("at " + BOX_A) and s["seconds"] == 30.0
    table = ablation.format_table(summary, "grpo").splitlines()
    assert table[0].startswith("| variant | soft-F1 own |") and "− grpo" in table[0]
    assert table[2].startswith("| grpo | 0.500 | 0.000 | +0.500") and "(reference)" in table[2]
    assert table[3].startswith("| gspo | 1.000 | 0.500 | +0.500") and "| +0.000 (" in table[3]
    assert table[3].endswith(f"| {len('at ' + BOX_A)} | 30 |")


def test_read_rows_skips_a_header_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"radvlm_predictions": {"model": "m"}}\n'
                    '{"id": "b", "task": "abnormality_grounding", "answer": "x", "reference": "y"}\n\n'
                    '{"id": "a", "task": "abnormality_grounding", "answer": "x", "reference": "y"}\n')
    assert [r["id"] for r in ablation.read_rows(path)] == ["a", "b"]


def test_curves_come_from_each_variants_tensorboard_versions_and_draw_one_png(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    for name, versions in {"grpo": [[(0, 0.1), (20, 0.3)], [(40, 0.4)]], "cispo": [[(0, 0.1), (20, 0.2)]]}.items():
        for k, points in enumerate(versions):
            writer = SummaryWriter(str(tmp_path / name / f"version_{k}"))
            for step, value in points:
                writer.add_scalar("val/soft_f1", value, step)
                writer.add_scalar("train/loss", -value, step)
            writer.close()
    tag, curves = ablation.read_curves(tmp_path, ["grpo", "cispo", "sapo"])
    assert tag == "val/soft_f1"
    assert [s for s, _ in curves["grpo"]] == [0, 20, 40]
    assert [round(v, 6) for _, v in curves["grpo"]] == [0.1, 0.3, 0.4]
    assert [round(v, 6) for _, v in curves["cispo"]] == [0.1, 0.2]
    assert curves["sapo"] == []  # a variant without a log: no points, no error
    png = ablation.plot_curves(tag, curves, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ablation.read_curves(tmp_path, ["grpo"], tags=("val/none",)) == (None, {"grpo": []})


def test_nan_seconds_when_a_variant_was_not_timed():
    own = {"grpo": rows([BOX_A, BOX_B])}
    summary = ablation.summarise(own, own, {}, reference="grpo", n_boot=50)
    assert math.isnan(summary["grpo"]["seconds"])
