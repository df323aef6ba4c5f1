import json
from pathlib import Path

from radvlm_tools.demo import format_summary, summarise


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def row(i, answer, reference, task="abnormality_grounding"):
    return {"id": f"s{i}", "task": task, "answer": answer, "reference": reference}


BOX = "[0.1, 0.1, 0.5, 0.5]"
OTHER = "[0.6, 0.6, 0.9, 0.9]"


def test_summary_pairs_models_on_the_same_samples(tmp_path):
    refs = [f"at {BOX}", f"at {BOX}"]
    sft = write(tmp_path / "sft.jsonl", [row(0, "none", refs[0]), row(1, f"at {BOX}", refs[1]),
                                         row(2, "The heart is normal.", "The heart is normal.", "report_generation")])
    # GRPO rows in another order: the pairing is by id
    grpo = write(tmp_path / "grpo.jsonl", [row(1, f"at {BOX}", refs[1]), row(0, f"at {BOX}", refs[0]),
                                           row(2, "Normal.", "The heart is normal.", "report_generation")])
    s = summarise({"sft": sft, "grpo": grpo})
    # soft-F1: SFT (0 + 1) / 2 = 0.5, GRPO (1 + 1) / 2 = 1; paired delta mean (1 + 0) / 2 = 0.5
    assert s["sft"]["soft_f1"] == 0.5 and s["grpo"]["soft_f1"] == 1.0
    assert s["paired"]["soft_f1"]["delta"] == 0.5 and s["paired"]["soft_f1"]["n"] == 2
    assert 0.0 <= s["paired"]["soft_f1"]["ci95_low"] <= 0.5 <= s["paired"]["soft_f1"]["ci95_high"] <= 1.0
    assert "soft_f1_image" not in s["paired"]  # no shuffle control given
    assert s["sft"]["gleu"] == 1.0 and s["grpo"]["report_chars"] == len("Normal.")
    table = format_summary(s, {"sft": 1.0})
    assert "| grpo | 1.000 |" in table and "soft-F1 +0.500" in table


def test_summary_with_the_shuffle_control(tmp_path):
    refs = [f"at {BOX}", f"at {OTHER}"]
    own = {"sft": [row(0, f"at {BOX}", refs[0]), row(1, f"at {BOX}", refs[1])],  # 1, 0: a constant answer
           "grpo": [row(0, f"at {BOX}", refs[0]), row(1, f"at {OTHER}", refs[1])]}  # 1, 1: reads the image
    shuffled = {"sft": [row(0, f"at {BOX}", refs[0]), row(1, f"at {BOX}", refs[1])],  # same as own: prior only
                "grpo": [row(0, f"at {OTHER}", refs[0]), row(1, f"at {BOX}", refs[1])]}  # 0, 0 on other images
    files = {k: write(tmp_path / f"{k}.jsonl", v) for k, v in own.items()}
    shuf = {k: write(tmp_path / f"{k}_shuffled.jsonl", v) for k, v in shuffled.items()}
    s = summarise(files, shuf)
    assert s["sft"]["shuffle"]["soft_f1"]["own"] == 0.5 and s["sft"]["shuffle"]["soft_f1"]["image"] == 0.0
    assert s["grpo"]["shuffle"]["soft_f1"]["shuffled"] == 0.0 and s["grpo"]["shuffle"]["soft_f1"]["image"] == 1.0
    assert s["grpo"]["shuffle"]["map"]["image"] == 1.0
    assert s["paired"]["soft_f1_image"]["delta"] == 1.0  # image-dependent part: 0 → 1 on both records
    table = format_summary(s, {"sft": 1.0})
    assert "| sft | 0.500 | 0.500 | +0.000 (+0.000 … +0.000) |" in table
    assert "image-dependent soft-F1 +1.000 (+1.000 … +1.000)" in table


def test_the_demo_runs_from_the_repository_root():
    # the demo's subprocesses run main.py with configs/demo/* relative to ROOT (broke once when the tool moved)
    from radvlm_tools.demo import ROOT

    assert (ROOT / "main.py").is_file() and (ROOT / "Makefile").is_file()
    for name in ("sft.yaml", "grpo.yaml", "predict.yaml", "coldstart.yaml", "grpo_thinking.yaml"):
        assert (ROOT / "configs" / "demo" / name).is_file()


def test_the_demo_driver_runs_the_stages_in_order_and_writes_the_summary(tmp_path, monkeypatch, capsys):
    # every subprocess is faked: the test checks the driver (order, overlap, arguments, summary), not training
    import radvlm_tools.demo as demo

    events = []

    class FakeJob:
        def __init__(self, args, **kwargs):
            self.args, self.returncode = args, 0
            kind = "predict" if "predict" in args else ("grpo" if any("grpo" in a for a in args) else "sft")
            shuffled = "--data.init_args.shuffle_images" in args
            events.append(("start", kind, shuffled, "/sft/hf_export" in " ".join(args)))
            if kind == "predict":
                out = args[args.index("--trainer.callbacks.init_args.output") + 1]
                answers = [f"at {OTHER}", f"at {BOX}"] if shuffled else [f"at {BOX}", f"at {OTHER}"]
                rows = [row(i, a, r) for i, (a, r) in enumerate(zip(answers, [f"at {BOX}", f"at {OTHER}"]))]
                if not shuffled:
                    rows.append(row(9, "The heart is normal.", "The heart is normal.", "report_generation"))
                write(Path(out), rows)

        def wait(self):
            events.append(("wait", " ".join(self.args)))
            return 0

    monkeypatch.setattr(demo, "prepare", lambda out: None)
    monkeypatch.setattr(demo.subprocess, "Popen", FakeJob)
    (tmp_path / "predictions").mkdir()
    demo.main(["--out", str(tmp_path)])
    starts = [e[1:] for e in events if e[0] == "start"]
    assert [s[0] for s in starts] == ["sft", "grpo", "predict", "predict", "predict", "predict"]
    # the SFT model's predictions start while GRPO runs (before GRPO is waited for), own then shuffled images
    grpo_wait = next(i for i, e in enumerate(events) if e[0] == "wait" and "grpo.yaml" in e[1])
    sft_predicts = [i for i, e in enumerate(events) if e[0] == "start" and e[1] == "predict" and e[3]]
    assert len(sft_predicts) == 2 and all(i < grpo_wait for i in sft_predicts)
    assert [s[1] for s in starts[2:]] == [False, True, False, True]
    summary = json.loads((tmp_path / "summary.json").read_text())
    for name in ("sft", "grpo"):  # own answers are right on both records, shuffled ones on none
        assert summary[name]["shuffle"]["soft_f1"]["own"] == 1.0
        assert summary[name]["shuffle"]["soft_f1"]["shuffled"] == 0.0
    assert "image-dependent" in capsys.readouterr().out


def test_a_failed_prediction_stops_the_grpo_run_beside_it(tmp_path, monkeypatch):
    import pytest

    import radvlm_tools.demo as demo

    stopped = []

    class FakeJob:
        def __init__(self, args, **kwargs):
            self.args = args
            self.returncode = 1 if "predict" in args else 0

        def wait(self):
            return self.returncode

        def terminate(self):
            stopped.append(" ".join(self.args))

    monkeypatch.setattr(demo, "prepare", lambda out: None)
    monkeypatch.setattr(demo.subprocess, "Popen", FakeJob)
    with pytest.raises(SystemExit, match="held-out predictions"):
        demo.main(["--out", str(tmp_path)])
    assert len(stopped) == 1 and "grpo.yaml" in stopped[0]
