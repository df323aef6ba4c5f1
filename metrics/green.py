"""GREEN (Ostmeier et al. 2024): an LLM judge counts the errors of a candidate report against a reference.

Published definition (Stanford-AIMI/GREEN ``green_score``, identical in RadEval 2.x; docs/paper.md §11):
prompt ``green_prompt``, judge ``HFJudge``, parsing ``parse_green``, score ``GreenCounts.score`` = matched /
(matched + Σ clinically significant errors (a)–(f)); the metric is ``GREEN``.

Deviations, all on purpose (each described where it is made): an unparsable judge output or a judge error is
NaN, not 0 (``parse_green``, ``GREEN``); matched findings are read as RadEval reads them (``matched_count``);
the local judge decodes only the new tokens (``HFJudge``); an endpoint judge lets the server render the chat
template (``EndpointJudge``); identical pairs are judged once, reports are also cut to ``max_chars``
characters and scoring can be cancelled (``GREEN``).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from metrics.base import PerSampleMetric, cancel_event, check_cancelled, check_pairs, load_once, resolve_device, warn_once
from metrics.judge import ChatClient

DEFAULT_JUDGE = "StanfordAIMI/GREEN-radllama2-7b"
MAX_WORDS = 300
MAX_CHARS = 4096  # per report, after the word cut (ours: bounds junk "words")
MAX_LENGTH = 2048  # tokens, prompt included

#: Source of GREEN_PROMPT and GREEN_CHAT_TEMPLATE (MIT licence): github.com/Stanford-AIMI/GREEN, commit d72c195,
#: ``green_score/utils.py::make_prompt`` (the f-string, with ``{text1}``/``{text2}`` renamed ``{reference}``/
#: ``{candidate}``) and ``green_score/green.py`` (``chat_template``); the same text is in RadEval 2.x
#: ``radeval/metrics/green_score/``. DATA, not code: keep it byte-identical (a test checks its SHA-256).
GREEN_SOURCE = "https://github.com/Stanford-AIMI/GREEN (green_score/utils.py make_prompt; green_score/green.py)"
# ---- published GREEN prompt, verbatim (do not edit) ---------------------------------------------------------
GREEN_PROMPT = (
    "Objective: Evaluate the accuracy of a candidate radiology report in comparison to a reference radiology "
    "report composed by expert radiologists.\n"
    "\n"
    "    Process Overview: You will be presented with:\n"
    "\n"
    "    1. The criteria for making a judgment.\n"
    "    2. The reference radiology report.\n"
    "    3. The candidate radiology report.\n"
    "    4. The desired format for your assessment.\n"
    "\n"
    "    1. Criteria for Judgment:\n"
    "\n"
    "    For each candidate report, determine:\n"
    "\n"
    "    The count of clinically significant errors.\n"
    "    The count of clinically insignificant errors.\n"
    "\n"
    "    Errors can fall into one of these categories:\n"
    "\n"
    "    a) False report of a finding in the candidate.\n"
    "    b) Missing a finding present in the reference.\n"
    "    c) Misidentification of a finding's anatomic location/position.\n"
    "    d) Misassessment of the severity of a finding.\n"
    "    e) Mentioning a comparison that isn't in the reference.\n"
    "    f) Omitting a comparison detailing a change from a prior study.\n"
    "    Note: Concentrate on the clinical findings rather than the report's writing style. Evaluate only the "
    "findings that appear in both reports.\n"
    "\n"
    "    2. Reference Report:\n"
    "    {reference}\n"
    "\n"
    "    3. Candidate Report:\n"
    "    {candidate}\n"
    "\n"
    "    4. Reporting Your Assessment:\n"
    "\n"
    "    Follow this specific format for your output, even if no errors are found:\n"
    "    ```\n"
    "    [Explanation]:\n"
    "    <Explanation>\n"
    "\n"
    "    [Clinically Significant Errors]:\n"
    "    (a) <Error Type>: <The number of errors>. <Error 1>; <Error 2>; ...; <Error n>\n"
    "    ....\n"
    "    (f) <Error Type>: <The number of errors>. <Error 1>; <Error 2>; ...; <Error n>\n"
    "\n"
    "    [Clinically Insignificant Errors]:\n"
    "    (a) <Error Type>: <The number of errors>. <Error 1>; <Error 2>; ...; <Error n>\n"
    "    ....\n"
    "    (f) <Error Type>: <The number of errors>. <Error 1>; <Error 2>; ...; <Error n>\n"
    "\n"
    "    [Matched Findings]:\n"
    "    <The number of matched findings>. <Finding 1>; <Finding 2>; ...; <Finding n>\n"
    "    ```\n"
)
# ---- end of the published prompt -------------------------------------------------------------------------------
GREEN_CHAT_TEMPLATE = (  # published, verbatim
    "{% for message in messages %}\n{% if message['from'] == 'human' %}\n{{ '<|user|>\n' + message['value'] + "
    "eos_token }}\n{% elif message['from'] == 'system' %}\n{{ '<|system|>\n' + message['value'] + eos_token }}\n"
    "{% elif message['from'] == 'gpt' %}\n{{ '<|assistant|>\n'  + message['value'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
SIGNIFICANT, INSIGNIFICANT, MATCHED = "Clinically Significant Errors", "Clinically Insignificant Errors", "Matched Findings"
#: the six error categories, (a)–(f), as the published scorer names them
ERROR_CATEGORIES = (
    "(a) False report of a finding in the candidate",
    "(b) Missing a finding present in the reference",
    "(c) Misidentification of a finding's anatomic location/position",
    "(d) Misassessment of the severity of a finding",
    "(e) Mentioning a comparison that isn't in the reference",
    "(f) Omitting a comparison detailing a change from a prior study",
)


def cut_words(text: str, max_words: int = MAX_WORDS, max_chars: int | None = None) -> str:
    """The first ``max_words`` whitespace-separated words, joined by single spaces (GREEN's report cut), then
    at most ``max_chars`` characters (ours; None: no character cut)."""
    return " ".join(text.split()[:max_words])[:max_chars]


def green_prompt(reference: str, candidate: str, max_words: int = MAX_WORDS, max_chars: int | None = None) -> str:
    """The published GREEN prompt for one pair, each report cut to ``max_words`` words (and ``max_chars``).

    ``GREEN_PROMPT`` is the published text verbatim; each report is cut to its first 300 words
    (``" ".join(text.split()[:300])``, which also collapses whitespace).
    """
    return GREEN_PROMPT.format(reference=cut_words(reference, max_words, max_chars),
                               candidate=cut_words(candidate, max_words, max_chars))


# ------------------------------------------------------------------------------------------------ parsing
@dataclass(frozen=True)
class GreenCounts:
    """Error counts of one judge output: (a)–(f) clinically significant and insignificant, matched findings."""

    significant: tuple[int, ...]
    insignificant: tuple[int, ...]
    matched: int

    @property
    def score(self) -> float:
        """matched / (matched + Σ significant errors); 0 when nothing matched."""
        if self.matched == 0:
            return 0.0
        return self.matched / (self.matched + sum(self.significant))


def clean_response(text: str) -> str:
    """What follows the last ``<|assistant|>`` (if any), without ``</s>`` and ``<unk>`` strings."""
    return text.rsplit("<|assistant|>", 1)[-1].replace("</s>", "").replace("<unk>", "")


def section(text: str, name: str) -> str | None:
    """The body after ``[name]:`` (leading whitespace skipped) up to a blank line or the end; None if absent."""
    match = re.search(rf"\[{re.escape(name)}\]:\s*(.*?)(?:\n\s*\n|\Z)", text, re.DOTALL)
    return None if match is None else match.group(1)


def error_counts(body: str) -> tuple[int, ...]:
    """Counts (a)–(f) of an error section body: each category's line ``(x) …: N.``; "No…" → all 0."""
    counts = [0] * len(ERROR_CATEGORIES)
    if body.startswith("No"):
        return tuple(counts)
    lines, markers = sorted(re.findall(r"\([a-f]\) .*", body)), [f"({c}) " for c in "abcdef"]
    if not lines:  # the judge numbered the categories instead
        lines, markers = sorted(re.findall(r"\([1-6]\) .*", body)), [f"({i}) " for i in range(1, 7)]
    for k, marker in enumerate(markers):
        for line in lines:  # the last line of a category with a readable count wins (published)
            if line.startswith(marker) and (number := re.search(r"(?<=: )\b\d+\b(?=\.)", line)):
                counts[k] = int(number.group(0))
    return tuple(counts)


def matched_count(body: str) -> int | None:
    """Matched findings: 0 for a "No…" body, else the first line starting ``N.``; None when there is none.

    Deviation: matched findings are read from the first line of the section starting ``N.`` (RadEval's reading,
    multiline); the original GREEN only reads ``N.`` at the very start of the section body (the same for a
    well-formed answer).
    """
    if body.startswith("No"):
        return 0
    number = re.search(r"^\b\d+\b(?=\.)", body, re.MULTILINE)
    return None if number is None else int(number.group(0))


def parse_green(text: str) -> GreenCounts | None:
    """The counts of a judge output in the published format, or None when it cannot be parsed.

    Published parsing: the text after ``[Category]:`` up to the first blank line (or the end); a body starting
    with "No" counts 0 everywhere; in ``[Clinically Significant Errors]`` (and ``[Clinically Insignificant
    Errors]``) the lines ``(a) …`` … ``(f) …`` (or ``(1)`` … ``(6)`` when no lettered line is present), each
    counting the first ``: N.`` of its line (a number without the final ``.`` is not counted: 0); matched
    findings = the first line of the ``[Matched Findings]`` body that starts with ``N.`` (``matched_count``).

    Deviation: an output that cannot be parsed (no ``[Clinically Significant Errors]`` or no ``[Matched
    Findings]`` section, or a matched-findings body that neither starts with "No" nor has a line starting
    ``N.``) gives None, hence NaN (``green_value``); the published scorer gives such an output 0 (its
    ``for_reward=True`` path gives None).
    """
    text = clean_response(text)
    significant, matched = section(text, SIGNIFICANT), section(text, MATCHED)
    if significant is None or matched is None:
        return None
    n_matched = matched_count(matched)
    if n_matched is None:
        return None
    insignificant = section(text, INSIGNIFICANT)
    return GreenCounts(error_counts(significant),
                       error_counts(insignificant) if insignificant is not None else (0,) * len(ERROR_CATEGORIES),
                       n_matched)


def green_value(text: str) -> float:
    """GREEN of one judge output; NaN when it cannot be parsed."""
    counts = parse_green(text)
    return float("nan") if counts is None else counts.score


# ------------------------------------------------------------------------------------------------- judges
Judge = Callable[[Sequence[str]], list]  # prompts -> per prompt the output text or the exception it raised

_JUDGES: dict[tuple, Any] = {}


def _load_causal_lm(model: str, device: str, dtype: str, chat_template: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.eos_token_id is None:
        raise ValueError(f"GREEN judge {model!r}: its tokenizer has no EOS token")
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).to(device).eval()
    return tokenizer, lm


class HFJudge:
    """A local Hugging Face causal LM judge (folder or hub id): batched greedy ``generate``.

    The published judge: ``StanfordAIMI/GREEN-radllama2-7b``, the published chat template
    (``GREEN_CHAT_TEMPLATE``: one human turn, an empty assistant turn, then the generation prompt), greedy
    decoding, 2048 tokens in all (prompt included), left-padded batches of 8, float16 on GPU. Loaded once under
    ``metrics.base.load_once``, so hub downloads only with ``RADVLM_ALLOW_DOWNLOADS=1``. Device: None or
    ``"cuda"`` is this process's own GPU (``LOCAL_RANK``, ``metrics.base.resolve_device``).

    Deviation: it decodes only the new tokens (the published code decodes prompt + completion and keeps what
    follows the last ``<|assistant|>``; the same text); ``</s>`` and ``<unk>`` strings are removed as
    published. The prompt ids get the tokenizer's own special tokens plus a final EOS (``append_eos``, the
    effect of the published ``add_eos_token=True`` Llama tokenizer); ``trust_remote_code`` is never set.
    """

    def __init__(self, model: str = DEFAULT_JUDGE, device: str | None = None, dtype: str | None = None,
                 batch_size: int = 8, max_length: int = MAX_LENGTH, max_new_tokens: int | None = None,
                 append_eos: bool = True, chat_template: str | None = GREEN_CHAT_TEMPLATE) -> None:
        if batch_size < 1 or max_length < 1:
            raise ValueError("HFJudge: batch_size and max_length must be >= 1")
        self.model, self.batch_size, self.max_length = model, batch_size, max_length
        self.device = resolve_device(device)  # this rank's GPU for None or "cuda"
        self.dtype = dtype or ("float16" if self.device.startswith("cuda") else "float32")
        self.max_new_tokens, self.append_eos, self.chat_template = max_new_tokens, append_eos, chat_template
        self.name = f"local:{model}"

    def load(self):
        """``(tokenizer, model)``, loaded once per process; raises when the weights cannot be read."""
        key = (self.model, self.device, self.dtype, self.chat_template)
        return load_once(_JUDGES, key, lambda: _load_causal_lm(self.model, self.device, self.dtype, self.chat_template))

    def prompt_ids(self, tokenizer, prompt: str) -> list[int]:
        if tokenizer.chat_template is not None:
            text = tokenizer.apply_chat_template([{"from": "human", "value": prompt}, {"from": "gpt", "value": ""}],
                                                 tokenize=False, add_generation_prompt=True)
        else:
            text = prompt
        ids = list(tokenizer(text)["input_ids"])
        eos = tokenizer.eos_token_id
        if self.append_eos and (not ids or ids[-1] != eos):
            ids.append(eos)
        return ids[: self.max_length - 1] + ids[-1:] if len(ids) > self.max_length else ids

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], cancel: Any = None) -> list[str]:
        """Greedy outputs of ``prompts``; with a ``cancel`` event, generation stops at the next token once it
        is set (and :class:`metrics.base.ScoringCancelled` is raised)."""
        tokenizer, lm = self.load()
        rows = [self.prompt_ids(tokenizer, p) for p in prompts]
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, L) left-padded
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        budget = self.max_length - width  # 2048 tokens in all, prompt included
        if self.max_new_tokens is not None:
            budget = min(budget, self.max_new_tokens)
        if budget <= 0:
            return [""] * len(prompts)
        extra = {}
        if cancel is not None:
            from transformers import StoppingCriteriaList

            extra["stopping_criteria"] = StoppingCriteriaList([_StopWhenSet(cancel)])
        out = lm.generate(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), max_new_tokens=budget,
                          do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, **extra)
        check_cancelled(cancel)
        return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)

    def __call__(self, prompts: Sequence[str]) -> list[str | Exception]:
        self.load()  # a judge that cannot be loaded raises here, for every prompt at once
        cancel = cancel_event()
        out: list[str | Exception] = []
        for start in range(0, len(prompts), self.batch_size):
            check_cancelled(cancel)
            batch = prompts[start:start + self.batch_size]
            try:
                out.extend(self.generate(batch, cancel))
            except Exception as exc:  # noqa: BLE001  (reported per prompt)
                out.extend([exc] * len(batch))
        return out


class EndpointJudge:
    """An OpenAI-compatible endpoint judge: one user message per prompt, temperature 0, ``workers`` threads.

    Requests go through ``metrics.judge.ChatClient``, the project's one such client. Deviation: the prompt is
    sent as one user message, so the server renders its own chat template. To reproduce the published setting
    serve the GREEN model with ``GREEN_CHAT_TEMPLATE`` and a 2048-token context (vLLM: ``--chat-template``,
    ``--max-model-len 2048``); ``max_tokens`` is left to the server unless given.
    """

    def __init__(self, endpoint: str, model: str = DEFAULT_JUDGE, api_key: str | None = None,
                 max_tokens: int | None = None, timeout: float | None = 300.0, retries: int = 2, backoff: float = 1.0,
                 workers: int = 4) -> None:
        self.client = ChatClient(endpoint, model, api_key=api_key, max_tokens=max_tokens, temperature=0.0,
                                 timeout=timeout, retries=retries, backoff=backoff)
        self.workers = max(1, workers)
        self.name = f"endpoint:{model}@{endpoint}"

    def _one(self, prompt: str, cancel: Any = None) -> str | Exception:
        check_cancelled(cancel)  # ScoringCancelled is no Exception: it ends the map below
        try:
            return self.client.chat([{"role": "user", "content": prompt}])
        except Exception as exc:  # noqa: BLE001  (reported per prompt)
            return exc

    def __call__(self, prompts: Sequence[str]) -> list[str | Exception]:
        cancel = cancel_event()  # of the scoring thread; the pool's threads have none of their own
        pool = ThreadPoolExecutor(self.workers)
        try:
            return list(pool.map(lambda p: self._one(p, cancel), prompts))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------------- metric
class GREEN(PerSampleMetric):
    """Per-sample GREEN; NaN where the judge failed or its output could not be parsed.

    Judges: a local causal LM (``HFJudge``) or an OpenAI-compatible endpoint (``EndpointJudge``), or any
    callable ``list[str] -> list[str | Exception]`` passed as ``judge``. ``GREEN`` picks: ``judge`` if given,
    else ``endpoint`` if given, else ``HFJudge(model)``.

    Deviations, all on purpose:

    - an unparsable judge output (``parse_green``) is NaN and counted in ``stats["unparsable"]``. A judge error
      (endpoint down after retries) is NaN, counted in ``stats["failed"]``; a judge that cannot be loaded
      makes every value NaN with one warning (``stats["unavailable"]``; ``strict=True`` raises instead).
      Unavailable is not low (DESIGN.md).
    - identical (reference, candidate) pairs within one ``score`` call are judged once.
    - bounded input: after the 300-word cut each report is also cut to ``max_chars`` characters (4096: never
      reached by 300 words of ordinary length, which the published cut allows to be arbitrarily long), so an
      endpoint request is bounded too; the local judge's prompt is at most ``max_length`` tokens as published.
    - cancellation (``metrics.base.check_cancelled``): checked before every local batch, by a stopping
      criterion of ``generate`` at every new token, and before every endpoint request (a request in flight
      ends at the client's ``timeout``).
    """

    higher_is_better = True
    worst_value = 0.0

    def __init__(self, model: str = DEFAULT_JUDGE, endpoint: str | None = None, api_key: str | None = None,
                 judge: Judge | None = None, batch_size: int = 8, max_length: int = MAX_LENGTH,
                 max_new_tokens: int | None = None, max_words: int = MAX_WORDS, device: str | None = None,
                 timeout: float | None = 300.0, retries: int = 2, workers: int = 4, strict: bool = False,
                 max_chars: int | None = MAX_CHARS, api_key_env: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if api_key_env is not None:  # the key from the environment, so that configs need not hold it
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise ValueError(f"GREEN: the endpoint key variable {api_key_env} is not set")
        if judge is None:
            judge = (EndpointJudge(endpoint, model, api_key=api_key, timeout=timeout, retries=retries, workers=workers)
                     if endpoint else HFJudge(model, device=device, batch_size=batch_size, max_length=max_length,
                                              max_new_tokens=max_new_tokens))
        self.judge, self.max_words, self.max_chars, self.strict = judge, max_words, max_chars, strict
        self.stats: Counter = Counter()  # scored, unparsable, failed, unavailable
        self.last_outputs: list[str | None] = []  # judge output per sample of the last ``score`` call

    def judge_name(self) -> str:
        return str(getattr(self.judge, "name", type(self.judge).__name__))

    def score(self, preds: Sequence[str], targets: Sequence[str]) -> torch.Tensor:  # (N,)
        check_pairs(preds, targets)
        prompts = [green_prompt(t, p, self.max_words, self.max_chars) for p, t in zip(preds, targets)]
        distinct = list(dict.fromkeys(prompts))
        values = torch.full((len(prompts),), float("nan"), dtype=torch.float32)
        self.last_outputs = [None] * len(prompts)
        if not prompts:
            return values
        try:
            outputs = list(self.judge(distinct))
            if len(outputs) != len(distinct):
                raise RuntimeError(f"the judge returned {len(outputs)} outputs for {len(distinct)} prompts")
        except Exception as exc:
            if self.strict:
                raise
            self.stats["unavailable"] += len(prompts)
            warn_once(f"green-load:{self.judge_name()}", f"GREEN judge {self.judge_name()} is unavailable "
                       f"({type(exc).__name__}: {exc}); GREEN values are NaN")
            return values
        table = dict(zip(distinct, outputs))
        for i, prompt in enumerate(prompts):
            out = table[prompt]
            if isinstance(out, BaseException):
                self.stats["failed"] += 1
                warn_once(f"green-fail:{type(out).__name__}", f"GREEN judge {self.judge_name()} failed on a pair "
                           f"({type(out).__name__}: {out}); its value is NaN")
                continue
            self.last_outputs[i] = str(out)
            values[i] = green_value(str(out))
            self.stats["unparsable" if torch.isnan(values[i]) else "scored"] += 1
        return values


class _StopWhenSet:
    """A ``generate`` stopping criterion: every row is done once ``event`` is set."""

    def __init__(self, event: Any) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:  # (B,) bool
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)

