"""Prompt parity: our encoder renders conversations exactly as the checkpoint's own chat template does.

The real Qwen3-VL templates are checked in as test data (tests/data/README.md says where they come from):
for every conversation shape we use, our ids equal ``tokenizer(apply_chat_template(messages))`` and the
labels cover exactly each assistant turn's content and its ``<|im_end|>``.
"""

import json
import logging
import shutil
from pathlib import Path

import pytest

import radvlm.chat as chat
from radvlm.chat import IGNORE_INDEX, encode_conversation, render_segments, template_opens_thinking
from radvlm.processor import load_processor
from radvlm.tiny import CHAT_TEMPLATE

DATA = Path(__file__).resolve().parents[1] / "data"
TEMPLATES = {name: (DATA / f"qwen3_vl_{name}_chat_template.jinja").read_text(encoding="utf-8")
             for name in ("instruct", "thinking")}

Q1, Q2 = "Where is the heart?", "Is there an effusion? /think"
A1 = "The heart is located at the coordinates [0.12, 0.3, 0.5, 0.71] on the image."
A2 = "<think>\nLook at the costophrenic angles.\n</think>\n\nNo, the lungs are clear."
CONVERSATIONS = {
    "single": [("user", Q1), ("assistant", A1)],
    "single_thinking": [("user", Q2), ("assistant", A2)],
    "multi": [("user", Q1), ("assistant", A1), ("user", Q2), ("assistant", A2)],
    "multi_thinking_first": [("user", Q2), ("assistant", A2), ("user", Q1), ("assistant", A1)],
}


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def template_tok(request, tiny_ckpt):
    tok = load_processor(tiny_ckpt).tokenizer
    tok.chat_template = TEMPLATES[request.param]
    return request.param, tok


def hf_messages(turns, image: bool) -> list[dict]:
    """The conversation in Hugging Face's multimodal form, written out independently of radvlm.chat."""
    out = []
    for i, (role, text) in enumerate(turns):
        if i == 0 and image:
            out.append({"role": role, "content": [{"type": "image"}, {"type": "text", "text": "\n" + text}]})
        else:
            out.append({"role": role, "content": text})
    return out


def reference_ids(tok, turns, image_tokens: int, generation_prompt: bool) -> list[int]:
    text = tok.apply_chat_template(hf_messages(turns, image_tokens > 0), tokenize=False,
                                   add_generation_prompt=generation_prompt)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * image_tokens, 1) if image_tokens else text
    return tok(text, add_special_tokens=False)["input_ids"]


def trained_ids(enc) -> list[int]:
    return [i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("image_tokens", [0, 1, 5])
def test_conversation_ids_equal_the_checkpoint_chat_template(template_tok, name, image_tokens):
    _, tok = template_tok
    turns = CONVERSATIONS[name]
    enc = encode_conversation(tok, turns, image_tokens=image_tokens)
    assert enc.input_ids == reference_ids(tok, turns, image_tokens, generation_prompt=False)
    assert enc.input_ids.count(tok.convert_tokens_to_ids("<|image_pad|>")) == image_tokens


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("image_tokens", [0, 3])
def test_generation_prompt_ids_equal_the_checkpoint_chat_template(template_tok, name, image_tokens):
    which, tok = template_tok
    prompt = CONVERSATIONS[name][:-1]
    enc = encode_conversation(tok, prompt, image_tokens=image_tokens, add_generation_prompt=True)
    assert enc.input_ids == reference_ids(tok, prompt, image_tokens, generation_prompt=True)
    if len(prompt) == 1:  # (earlier assistant turns of a multi-turn prompt keep their labels)
        assert set(enc.labels) == {IGNORE_INDEX}
    # a Thinking checkpoint opens the thinking block itself (no " /think" needed)
    header = "<|im_start|>assistant\n" + ("<think>\n" if which == "thinking" else "")
    assert tok.decode(enc.input_ids).endswith(header)


def test_image_newline_is_kept_as_the_authors_render_it(template_tok):
    _, tok = template_tok
    enc = encode_conversation(tok, [("user", Q1)], image_tokens=2, add_generation_prompt=True)
    assert f"<|vision_start|><|image_pad|><|image_pad|><|vision_end|>\n{Q1}<|im_end|>" in tok.decode(enc.input_ids)


def test_labels_cover_exactly_the_assistant_content_and_its_end_token(template_tok):
    which, tok = template_tok
    enc = encode_conversation(tok, CONVERSATIONS["multi"], image_tokens=4)
    if which == "instruct":  # every turn verbatim
        expected = A1 + "<|im_end|>" + A2 + "<|im_end|>"
    else:  # the Thinking template renders the final turn after its "<think>\n" header (the generation
        # prompt, not trained); earlier turns lose their trace (the template's own rendering)
        expected = A1 + "<|im_end|>" + A2.removeprefix("<think>\n") + "<|im_end|>"
    assert tok.decode(trained_ids(enc)) == expected
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(enc.input_ids, enc.labels))
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert all(lab == IGNORE_INDEX for i, lab in zip(enc.input_ids, enc.labels) if i == pad)


@pytest.mark.parametrize("name", ["single", "single_thinking", "multi"])
def test_training_sequence_continues_the_generation_prompt(template_tok, name):
    """What is trained on the last turn is exactly what the model generates after the prompt."""
    _, tok = template_tok
    turns = CONVERSATIONS[name]
    full = encode_conversation(tok, turns, image_tokens=3)
    prompt = encode_conversation(tok, turns[:-1], image_tokens=3, add_generation_prompt=True)
    n = len(prompt.input_ids)
    assert full.input_ids[:n] == prompt.input_ids
    tail = full.labels[n:]
    end = tail.index(IGNORE_INDEX) if IGNORE_INDEX in tail else len(tail)
    assert tail[:end] == full.input_ids[n : n + end] and tok.decode(tail[:end]).endswith("<|im_end|>")
    assert all(lab == IGNORE_INDEX for lab in tail[end:])  # the newline after <|im_end|>


@pytest.mark.parametrize("image", [False, True])
@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_tiny_template_renders_our_conversations_as_qwen3_vl_instruct(tiny_ckpt, image, system, generation_prompt):
    tok = load_processor(tiny_ckpt).tokenizer
    assert tok.chat_template == CHAT_TEMPLATE
    for turns in CONVERSATIONS.values():
        turns = ([("system", "You are a radiologist.")] if system else []) + turns
        turns = turns[:-1] if generation_prompt else turns
        messages = chat.chat_messages(turns, image=image)
        kwargs = dict(tokenize=False, add_generation_prompt=generation_prompt)
        ours = tok.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, **kwargs)
        assert ours == tok.apply_chat_template(messages, chat_template=TEMPLATES["instruct"], **kwargs)
        if not system:  # the built-in fallback layout too
            assert "".join(p for p, _ in render_segments(turns, int(image), generation_prompt)) == ours


def test_without_a_chat_template_the_builtin_layout_is_used_and_logged_once(tiny_ckpt, monkeypatch, caplog):
    tok = load_processor(tiny_ckpt).tokenizer
    reference = encode_conversation(tok, CONVERSATIONS["multi"], image_tokens=2)
    tok.chat_template = None
    monkeypatch.setattr(chat, "_warned_builtin", False)
    with caplog.at_level(logging.WARNING, logger="radvlm.chat"):
        builtin = encode_conversation(tok, CONVERSATIONS["multi"], image_tokens=2)
        encode_conversation(tok, CONVERSATIONS["single"], image_tokens=2)
    assert (builtin.input_ids, builtin.labels) == (reference.input_ids, reference.labels)
    assert sum("no chat template" in r.getMessage() for r in caplog.records) == 1


def test_load_processor_takes_the_template_of_chat_template_json(tiny_ckpt, tmp_path):
    folder = tmp_path / "thinking_ckpt"
    shutil.copytree(tiny_ckpt, folder)
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATES["thinking"]}))
    processor = load_processor(folder)
    assert processor.tokenizer.chat_template == TEMPLATES["thinking"] == processor.chat_template
    assert template_opens_thinking(processor.tokenizer)
    assert not template_opens_thinking(load_processor(tiny_ckpt).tokenizer)
