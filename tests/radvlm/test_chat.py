from radvlm.chat import (
    IGNORE_INDEX,
    answer_of,
    encode_conversation,
    make_thinking_answer,
    make_thinking_prompt,
    render_segments,
    split_thinking,
)
from radvlm.processor import load_processor


def test_split_thinking_closed_returns_text_after_last_close():
    assert split_thinking("<think>\nlook\n</think>\n\nNo effusion.") == ("look", "No effusion.", True)


def test_split_thinking_uses_last_close_tag_when_nested_looking():
    thoughts, answer, closed = split_thinking("<think>a </think> b </think> final")
    assert (answer, closed) == ("final", True)
    assert thoughts == "a </think> b"


def test_split_thinking_unclosed_and_empty():
    assert split_thinking("<think>still thinking") == ("still thinking", "", False)
    assert split_thinking("") == ("", "", False)
    assert split_thinking("<think></think>") == ("", "", True)


def test_answer_of_plain_prompt_keeps_whole_text():
    assert answer_of("  The heart is enlarged. ", thinking=False) == ("The heart is enlarged.", True)
    assert answer_of("<think>x", thinking=True) == ("", False)


def test_thinking_prompt_and_answer_format():
    assert make_thinking_prompt("Write a report.") == "Write a report. /think"
    assert make_thinking_prompt("Write a report. /think") == "Write a report. /think"
    assert make_thinking_answer(" t ", "A.") == "<think>\nt\n</think>\n\nA."


def test_render_matches_checkpoint_chat_template(tiny_ckpt):
    proc = load_processor(tiny_ckpt)
    turns = [("user", "Is there an effusion?"), ("assistant", "Yes."), ("user", "Where?"), ("assistant", "Left.")]
    ours = "".join(p for p, _ in render_segments(turns, image_tokens=1))
    messages = [
        # RadVLM's "<image>\nQuestion": the newline after the image is kept
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nIs there an effusion?"}]},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Where?"},
        {"role": "assistant", "content": "Left."},
    ]
    assert ours == proc.tokenizer.apply_chat_template(messages, tokenize=False)
    # segment-wise tokenisation equals tokenising the whole text
    enc = encode_conversation(proc.tokenizer, turns, image_tokens=1)
    assert enc.input_ids == proc.tokenizer.encode(ours, add_special_tokens=False)


def test_labels_cover_every_assistant_turn_and_its_end_token_only(tiny_ckpt):
    tok = load_processor(tiny_ckpt).tokenizer
    turns = [("user", "Is there an effusion?"), ("assistant", "Yes."), ("user", "Where?"), ("assistant", "Left.")]
    enc = encode_conversation(tok, turns, image_tokens=3)
    trained = [i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]
    # exactly the two answers, each followed by <|im_end|>
    expected = tok.encode("Yes.<|im_end|>", add_special_tokens=False) + tok.encode(
        "Left.<|im_end|>", add_special_tokens=False
    )
    assert trained == expected
    # the image pads, headers and user text are never trained
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert enc.input_ids.count(pad) == 3
    assert all(lab == IGNORE_INDEX for i, lab in zip(enc.input_ids, enc.labels) if i == pad)
    # labels equal ids where set
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(enc.input_ids, enc.labels))


def test_generation_prompt_ends_with_assistant_header(tiny_ckpt):
    tok = load_processor(tiny_ckpt).tokenizer
    enc = encode_conversation(tok, [("user", "Hi")], add_generation_prompt=True)
    assert tok.decode(enc.input_ids).endswith("<|im_start|>assistant\n")
    assert set(enc.labels) == {IGNORE_INDEX}
