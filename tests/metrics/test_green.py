"""GREEN (metrics/green.py): the published prompt, parsing of judge outputs in the published format, a tiny
random local judge end to end (garbage → NaN, counted) and a stand-in OpenAI-compatible judge (exact scores)."""

import hashlib
import math

import pytest
import torch

from metrics.green import (
    GREEN,
    GREEN_PROMPT,
    EndpointJudge,
    HFJudge,
    cut_words,
    green_prompt,
    green_value,
    parse_green,
)
from metrics.judge import ChatClient, PermanentError
from metrics.tiny import write_tiny_causal_lm
from tests.helpers import FakeChatServer

# A judge output in the published format: significant (a) 1 + (b) 2 = 3, matched 3 → 3 / (3 + 3) = 0.5
FULL = """[Explanation]:
The candidate reports a pneumothorax that is not in the reference and misses the effusion and the edema.

[Clinically Significant Errors]:
(a) False report of a finding in the candidate: 1. Right pneumothorax.
(b) Missing a finding present in the reference: 2. Left pleural effusion; pulmonary edema.
(c) Misidentification of a finding's anatomic location/position: 0.
(d) Misassessment of the severity of a finding: 0.
(e) Mentioning a comparison that isn't in the reference: 0.
(f) Omitting a comparison detailing a change from a prior study: 0.

[Clinically Insignificant Errors]:
(a) False report of a finding in the candidate: 0.
(b) Missing a finding present in the reference: 1. Old rib fracture.
(c) Misidentification of a finding's anatomic location/position: 0.
(d) Misassessment of the severity of a finding: 0.
(e) Mentioning a comparison that isn't in the reference: 0.
(f) Omitting a comparison detailing a change from a prior study: 0.

[Matched Findings]:
3. Cardiomegaly; clear upper lobes; no consolidation.
"""
# "No" bodies count 0: nothing significant, 2 matched → 2 / (2 + 0) = 1.0
NO_ERRORS = """[Explanation]:
Both reports agree.

[Clinically Significant Errors]:
No clinically significant errors.

[Clinically Insignificant Errors]:
None.

[Matched Findings]:
2. Cardiomegaly; small left effusion.
"""
# (a) has no final "." after its number: not counted; (b) counts 1; matched 1 → 1 / (1 + 1) = 0.5
NO_FINAL_DOT = """[Clinically Significant Errors]:
(a) False report of a finding in the candidate: 1 Right pneumothorax
(b) Missing a finding present in the reference: 1. Edema.

[Matched Findings]:
1. Cardiomegaly.
"""
# numbered categories (1)–(6) are read when no lettered line is present: (2) 1 + (4) 2 = 3, matched 1 → 0.25
NUMBERED = """[Clinically Significant Errors]:
(1) False report of a finding in the candidate: 0.
(2) Missing a finding present in the reference: 1. Effusion.
(4) Misassessment of the severity of a finding: 2. Edema; cardiomegaly.

[Matched Findings]:
1. Lines and tubes.
"""
# nothing matched: 0, not NaN, whatever the errors
NONE_MATCHED = """[Clinically Significant Errors]:
(a) False report of a finding in the candidate: 2. Effusion; edema.

[Matched Findings]:
No matched findings.
"""
# the first line of the matched section starting "N." (RadEval's multiline reading): 4 → 4 / (4 + 0) = 1.0
MATCHED_SECOND_LINE = """[Clinically Significant Errors]:
No errors.

[Matched Findings]:
The following findings match:
4. Cardiomegaly; edema; effusion; atelectasis.
"""


def test_prompt_is_the_published_text_byte_for_byte():
    reference = "Heart size is normal.  No pleural effusion.\nLungs are clear."
    candidate = "Mild cardiomegaly. " + " ".join(f"w{i}" for i in range(400))
    # SHA-256 of Stanford-AIMI/GREEN green_score/utils.py make_prompt(reference, candidate) at commit d72c195
    digest = "025215a68719bf689aa1c3905941f0bd06a91a97806ff8ff2ebc12a50257428a"
    assert hashlib.sha256(green_prompt(reference, candidate).encode()).hexdigest() == digest
    assert GREEN_PROMPT.count("{reference}") == 1 and GREEN_PROMPT.count("{candidate}") == 1


def test_reports_are_cut_to_their_first_300_words():
    text = " ".join(f"w{i}" for i in range(301)) + "\n\nlast"
    assert cut_words(text) == " ".join(f"w{i}" for i in range(300))
    prompt = green_prompt("a  b\nc", text)
    assert "    a b c\n" in prompt and "w299\n" in prompt and "w300" not in prompt and "last" not in prompt


@pytest.mark.parametrize("output, significant, insignificant, matched, score", [
    (FULL, (1, 2, 0, 0, 0, 0), (0, 1, 0, 0, 0, 0), 3, 0.5),
    (NO_ERRORS, (0,) * 6, (0,) * 6, 2, 1.0),
    (NO_FINAL_DOT, (0, 1, 0, 0, 0, 0), (0,) * 6, 1, 0.5),
    (NUMBERED, (0, 1, 0, 2, 0, 0), (0,) * 6, 1, 0.25),
    (NONE_MATCHED, (2, 0, 0, 0, 0, 0), (0,) * 6, 0, 0.0),
    (MATCHED_SECOND_LINE, (0,) * 6, (0,) * 6, 4, 1.0),
])
def test_published_format_is_parsed_into_counts_and_score(output, significant, insignificant, matched, score):
    counts = parse_green(output)
    assert counts is not None
    assert (counts.significant, counts.insignificant, counts.matched) == (significant, insignificant, matched)
    assert counts.score == score and green_value(output) == score


def test_chat_markers_and_end_tokens_are_cleaned_before_parsing():
    assert green_value("<|user|>\nprompt</s>\n<|assistant|>\n" + NO_ERRORS.replace("\n\n", "</s>\n\n", 1)) == 1.0


@pytest.mark.parametrize("output", [
    "",
    "The candidate report is mostly correct.",  # garbage
    "[Clinically Significant Errors]:\nNo errors.\n",  # no matched-findings section
    "[Matched Findings]:\n2. Cardiomegaly; effusion.\n",  # no significant-errors section
    "[Clinically Significant Errors]:\nNo errors.\n\n[Matched Findings]:\nCardiomegaly and effusion.\n",  # no count
    "\x1f�xon�ding�X",
])
def test_outputs_that_cannot_be_parsed_are_nan_never_zero(output):
    assert parse_green(output) is None and math.isnan(green_value(output))


def test_metric_counts_unparsable_outputs_and_failed_calls_and_judges_each_distinct_pair_once():
    seen = []

    def judge(prompts):
        seen.extend(prompts)
        return [FULL if "pneumothorax" in p else RuntimeError("judge down") if "edema" in p else "garbage"
                for p in prompts]

    metric = GREEN(judge=judge)
    preds = ["Right pneumothorax.", "Right pneumothorax.", "Pulmonary edema.", "Normal chest."]
    refs = ["Left effusion.", "Left effusion.", "Left effusion.", "Left effusion."]
    with pytest.warns(RuntimeWarning, match="judge down"):
        values = metric.score(preds, refs)
    assert values[:2].tolist() == [0.5, 0.5] and torch.isnan(values[2:]).all()
    assert len(seen) == 3  # the repeated pair is judged once
    assert metric.stats == {"scored": 2, "failed": 1, "unparsable": 1}
    assert metric.last_outputs[0] == FULL and metric.last_outputs[2] is None
    metric.update(preds, refs)
    assert metric.compute().item() == 0.5  # NaN left out of the mean, not counted as 0


# ------------------------------------------------------------------------------------- tiny local judge
@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory):
    return write_tiny_causal_lm(tmp_path_factory.mktemp("green") / "judge")


def test_tiny_random_local_judge_runs_end_to_end_and_its_garbage_is_nan(tiny_judge):
    metric = GREEN(model=tiny_judge, device="cpu", batch_size=2, max_new_tokens=8)
    preds, refs = ["Mild cardiomegaly.", "No effusion.", "Mild cardiomegaly."], ["Normal heart."] * 3
    values = metric.score(preds, refs)
    assert values.shape == (3,) and torch.isnan(values).all()
    assert metric.stats == {"unparsable": 3}  # judged, not failed: a real output that is not in the format
    assert all(isinstance(o, str) for o in metric.last_outputs)
    # the prompt ids: the published chat template, then a final EOS (the published add_eos_token=True)
    tokenizer, _ = metric.judge.load()
    ids = metric.judge.prompt_ids(tokenizer, green_prompt(refs[0], preds[0]))
    assert ids[-1] == tokenizer.eos_token_id and len(ids) <= 2048
    assert tokenizer.decode(ids).startswith("<|user|>\nObjective: Evaluate the accuracy")
    assert tokenizer.decode(ids).endswith("</s>\n<|assistant|>\n</s>\n<|assistant|>\n</s>")


def test_judge_batches_give_the_same_greedy_outputs_as_single_prompts(tiny_judge):
    prompts = [green_prompt("Normal heart.", p) for p in ("Mild cardiomegaly.", "No acute process at all.")]
    batched = HFJudge(tiny_judge, device="cpu", batch_size=2, max_new_tokens=6)(prompts)
    single = HFJudge(tiny_judge, device="cpu", batch_size=1, max_new_tokens=6)(prompts)
    assert batched == single


def test_missing_local_judge_is_nan_with_a_warning_or_raises_when_strict(tmp_path):
    metric = GREEN(model=str(tmp_path / "absent"), device="cpu")
    with pytest.warns(RuntimeWarning, match="GREEN judge .*absent.* is unavailable"):
        values = metric.score(["a b c d e f"], ["a b c d e g"])
    assert torch.isnan(values).all() and metric.stats == {"unavailable": 1}
    with pytest.raises(Exception, match="absent"):
        GREEN(model=str(tmp_path / "absent"), device="cpu", strict=True).score(["x"], ["y"])


# ------------------------------------------------------------------------------------- endpoint judge
def test_endpoint_judge_gets_greedy_requests_and_exact_scores_come_back():
    outputs = {"pneumothorax": FULL, "cardiomegaly": NO_ERRORS, "atelectasis": NUMBERED}

    def respond(payload):
        text = payload["messages"][0]["content"].lower()
        return next(v for k, v in outputs.items() if f"candidate report:\n    {k}" in text)

    with FakeChatServer(respond) as server:
        metric = GREEN(endpoint=server.url, api_key="sekret", workers=2)
        values = metric.score(["Pneumothorax on the right.", "Cardiomegaly.", "Atelectasis, left base."],
                              ["Left effusion.", "Cardiomegaly.", "Edema."])
    assert values.tolist() == [0.5, 1.0, 0.25]
    headers, payload = server.seen[0]
    assert payload["model"] == "StanfordAIMI/GREEN-radllama2-7b" and payload["temperature"] == 0.0
    assert "max_tokens" not in payload  # the server's context limit applies (2048 for the published setting)
    assert [m["role"] for m in payload["messages"]] == ["user"]
    assert payload["messages"][0]["content"].startswith("Objective: Evaluate the accuracy")
    assert headers["Authorization"] == "Bearer sekret"


def test_endpoint_retries_server_errors_and_a_client_error_is_nan_and_counted():
    plan = {"retry": [500, NO_ERRORS], "bad": [400, 400]}

    def respond(payload):
        text = payload["messages"][0]["content"]
        key = "retry" if "Retry" in text else "bad"
        return plan[key].pop(0)

    with FakeChatServer(respond) as server:
        metric = GREEN(judge=EndpointJudge(server.url, "green", retries=2, backoff=0.0))
        with pytest.warns(RuntimeWarning, match="HTTP 400"):
            values = metric.score(["Retry me.", "Bad request."], ["Normal.", "Normal."])
    assert values[0].item() == 1.0 and math.isnan(values[1].item())
    assert metric.stats == {"scored": 1, "failed": 1}
    assert len(server.seen) == 3  # 500 then 200 for the first; the 400 is not retried
    assert plan["bad"] == [400]


def test_chat_client_classifies_errors():
    with FakeChatServer(lambda payload: 404) as server:
        with pytest.raises(PermanentError, match="HTTP 404"):
            ChatClient(server.url, "m", retries=3, backoff=0.0).chat([{"role": "user", "content": "x"}])
        assert len(server.seen) == 1
    with pytest.raises(ConnectionError):
        ChatClient("http://127.0.0.1:9/v1", "m", timeout=2).chat([{"role": "user", "content": "x"}])
