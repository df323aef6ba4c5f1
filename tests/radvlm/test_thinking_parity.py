"""Thinking parity: which completions are thinking ones is a setting (on/off/auto), and where the answer is cut
from the trace is a per-reward setting that follows the authors (grounding: first </think>; RadCliQ and text
metrics: last), in training rewards, GRPO validation, predict and evaluation alike."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from datamodules.collate import PromptCollator
from datamodules.records import load_records
from lightning_modules.common import PolicyModule
from lightning_modules.grpo import GRPOModule
from metrics.grounding import BoxFormat, GroundingMAP, SoftF1
from metrics.radcliq import RadCliQ
from metrics.text import BLEU, GLEU, ROUGEL
from radvlm.chat import answer_of, resolve_thinking, split_thinking
from radvlm.processor import load_processor
from radvlm.rewards import RewardTerm, compute_rewards
from radvlm.tasks import task_think_split
from radvlm_tools.evaluate import scored_answer
from tests.helpers import report_record, write_records

BOX = "[0.1, 0.2, 0.3, 0.4]"
AUTHORS_EXAMPLE = f"<think>a</THINK> {BOX}"  # upper-case closing tag


class Echo:
    """A metric stub that records what it was asked to score (value 1 each, lower is better, worst 3)."""

    higher_is_better = False
    worst_value = 3.0

    def __init__(self):
        self.calls = []

    def score(self, preds, targets):
        self.calls.append(list(preds))
        return torch.ones(len(preds))


# ----------------------------------------------------------------------------------------------- splitting
def test_split_thinking_cuts_at_first_or_last_close_tag_case_insensitively():
    text = "<THINK>plan</Think> draft </think> final"
    assert split_thinking(text, "first") == ("plan", "draft </think> final", True)
    assert split_thinking(text, "last") == ("plan</Think> draft", "final", True)
    assert split_thinking("<think>never closed", "first") == ("never closed", "", False)
    # a Thinking template's prompt ends with "<think>\n": the completion has no opening tag
    assert split_thinking("trace\n</think>\n\nanswer", "first") == ("trace", "answer", True)
    with pytest.raises(ValueError, match="think_split"):
        split_thinking(text, "middle")


def test_thinking_mode_on_off_auto():
    assert resolve_thinking("Where is the heart?", "on") is True
    assert resolve_thinking("Where is the heart? /think", "off") is False
    assert (resolve_thinking("Where? /think", "auto"), resolve_thinking("Where?", "auto")) == (True, False)
    assert resolve_thinking("Where? /think") is True  # auto by default (today's rule)
    with pytest.raises(ValueError, match="thinking mode"):
        resolve_thinking("Where?", "sometimes")


# ------------------------------------------------------------------------------------------------- rewards
def test_reward_split_defaults_follow_the_authors_per_metric():
    for metric in (SoftF1, BoxFormat, GroundingMAP):
        assert metric.think_split == "first"
    for metric in (RadCliQ, GLEU, BLEU, ROUGEL):
        assert metric.think_split == "last"
    assert RewardTerm(SoftF1()).think_split == "first"
    assert RewardTerm(GLEU()).think_split == "last"
    assert RewardTerm(Echo()).think_split == "last"  # a metric without the attribute
    assert RewardTerm(SoftF1(), think_split="last").think_split == "last"  # explicit setting wins
    with pytest.raises(ValueError, match="think_split"):
        RewardTerm(Echo(), think_split="both")


def test_authors_grounding_example_scores_full_marks():
    # the text after the first (upper-case) </think> is exactly the target box: soft-F1 = 1 (was 0 before,
    # when </THINK> did not close the block and the completion got the worst value)
    res = compute_rewards([RewardTerm(SoftF1())], [AUTHORS_EXAMPLE], [BOX], ["abnormality_grounding"], [True])
    assert res.total.tolist() == [1.0] and res.closed.tolist() == [True]


def test_each_term_scores_the_answer_cut_at_its_own_split():
    first, last = Echo(), Echo()
    terms = [RewardTerm(first, name="first", think_split="first"), RewardTerm(last, name="last")]
    text = "<think>plan</think> draft </think> final"
    res = compute_rewards(terms, [text], ["ref"], ["report_generation"], [True])
    assert first.calls == [["draft </think> final"]] and last.calls == [["final"]]
    torch.testing.assert_close(res.total, torch.tensor([-2.0]))  # −1 − 1 (lower is better)


def test_missing_close_tag_gets_the_worst_value_for_either_split():
    terms = [RewardTerm(SoftF1(), tasks=["abnormality_grounding"]), RewardTerm(Echo(), tasks=["report_generation"])]
    res = compute_rewards(terms, [f"<think>{BOX}", "<think>The heart"], [BOX, "ref"],
                          ["abnormality_grounding", "report_generation"], [True, True])
    torch.testing.assert_close(res.total, torch.tensor([0.0, -3.0]))  # soft-F1 worst 0; Echo worst 3 → −3
    assert res.closed.tolist() == [False, False]


def test_task_split_for_evaluation_and_prediction():
    assert [task_think_split(t) for t in ("abnormality_grounding", "phrase_grounding", "anatomical_grounding",
                                          "abnormality_detection")] == ["first"] * 4
    assert [task_think_split(t) for t in ("report_generation", "abnormality_classification", None)] == ["last"] * 3


def test_evaluation_recuts_thinking_completions_by_task():
    row = {"id": "a", "task": "abnormality_grounding", "thinking": True, "completion": AUTHORS_EXAMPLE,
           "answer": "", "reference": BOX}
    assert scored_answer(row) == BOX
    report = {**row, "task": "report_generation", "completion": "<think>x</think> draft </think> final"}
    assert scored_answer(report) == "final"
    assert scored_answer({**row, "thinking": False, "answer": "as written"}) == "as written"


# ---------------------------------------------------------------------------------------- data and modules
@pytest.fixture(scope="module")
def records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("think_recs")
    recs = [report_record(0), report_record(1)]
    recs[1]["conversations"][0]["value"] += " /think"
    return load_records(write_records(folder, recs))


@pytest.mark.parametrize("mode, expected", [("auto", [False, True]), ("on", [True, True]), ("off", [False, False])])
def test_prompt_batches_carry_thinking_flags_from_the_mode(tiny_ckpt, records, mode, expected):
    batch = PromptCollator(load_processor(tiny_ckpt), thinking_mode=mode)(records)
    assert batch["thinking"] == expected


def test_auto_mode_with_a_thinking_template_warns(tiny_ckpt, caplog):
    processor = load_processor(tiny_ckpt)
    template = Path(__file__).resolve().parents[1] / "data" / "qwen3_vl_thinking_chat_template.jinja"
    processor.tokenizer.chat_template = template.read_text(encoding="utf-8")
    with caplog.at_level("WARNING", logger="datamodules.collate"):
        PromptCollator(processor, thinking_mode="auto")
        PromptCollator(processor, thinking_mode="on")
    assert sum("thinking_mode='on'" in r.getMessage() for r in caplog.records) == 1


def test_datamodule_passes_thinking_mode_to_its_collators(tiny_ckpt, phantom_dir):
    from datamodules.datamodule import RadVLMDataModule

    data = RadVLMDataModule(str(tiny_ckpt), phantom_dir=str(phantom_dir), collator=PromptCollator,
                            thinking_mode="on", check_images=False)
    data.setup("validate")
    assert data.collator.thinking_mode == "on"
    sft = RadVLMDataModule(str(tiny_ckpt), phantom_dir=str(phantom_dir), thinking_mode="off", check_images=False)
    sft.setup("validate")
    assert sft.collator.for_evaluation().prompts.thinking_mode == "off"
    assert sft.collator.for_prediction().thinking_mode == "off"


def _fake_module(texts, **extra):
    gen = SimpleNamespace(texts=texts, completion_mask=torch.ones(len(texts), 3), truncated=torch.zeros(len(texts)))
    return SimpleNamespace(policy=SimpleNamespace(generate=lambda *a, **k: gen), synced_generation=False,
                           shared_batch=lambda b: (b, False), **extra)


def _prompt_batch(tasks, thinking):
    n = len(tasks)
    return {"ids": [str(i) for i in range(n)], "tasks": tasks, "thinking": thinking, "targets": [BOX] * n,
            "prompts": ["Where?"] * n, "images": [None] * n, "gt_boxes": [[]] * n}


def test_grpo_validation_scores_each_metric_at_its_split():
    terms = [RewardTerm(SoftF1(), tasks=["abnormality_grounding"]), RewardTerm(Echo(), name="echo")]
    module = _fake_module(
        [AUTHORS_EXAMPLE], hparams=SimpleNamespace(val_max_new_tokens=8, max_new_tokens=8, num_logged_samples=1),
        val_terms=terms, val_metric_modules={"softf1": SoftF1()}, _val_chars=[], _val_rows=[])
    GRPOModule.validation_step(module, _prompt_batch(["abnormality_grounding"], [True]), 0)
    assert float(module.val_metric_modules["softf1"].compute()) == 1.0
    assert module._val_rows[0]["generated"] == BOX and module._val_chars == [len(BOX)]


def test_predict_rows_cut_the_answer_at_the_split_of_their_task():
    text = "<think>plan</think> draft </think> " + BOX
    module = _fake_module([AUTHORS_EXAMPLE, text], predict_max_new_tokens=8)
    rows = PolicyModule.predict_step(module, _prompt_batch(["abnormality_grounding", "report_generation"],
                                                           [True, True]), 0)
    assert [r["answer"] for r in rows] == [BOX, BOX]
    assert answer_of(text, True, "first")[0] != BOX  # the report row was cut at the last </think>
