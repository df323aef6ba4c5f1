import json

from radvlm.demo import format_summary, summarise


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def row(i, answer, reference, task="abnormality_grounding"):
    return {"id": f"s{i}", "task": task, "answer": answer, "reference": reference}


BOX = "[0.1, 0.1, 0.5, 0.5]"


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
    assert s["paired"]["soft_f1_delta"] == 0.5 and s["paired"]["n"] == 2
    assert 0.0 <= s["paired"]["ci95_low"] <= 0.5 <= s["paired"]["ci95_high"] <= 1.0
    assert s["sft"]["gleu"] == 1.0 and s["grpo"]["report_chars"] == len("Normal.")
    table = format_summary(s, {"sft": 1.0})
    assert "| grpo | 1.000 |" in table and "+0.500" in table
