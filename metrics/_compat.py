"""Restore two tokenizer methods that transformers 5 removed and that radgraph 0.1.18 and bert-score 0.3.13 call.

- ``encode_plus(text, text_pair=None, **kwargs)``: the single-example form of ``tokenizer(...)``. radgraph's
  bundled AllenNLP tokenizer calls it to reverse-engineer special tokens and to split words into word pieces.
- ``build_inputs_with_special_tokens(ids_0, ids_1=None)``: wraps already tokenised ids in the model's special
  tokens. radgraph's indexer calls it on every folded segment; bert-score calls it for an empty sentence.

``apply()`` adds each method to ``PreTrainedTokenizerBase`` only when it is missing there, so on transformers 4
(or a class that still defines it, like the pure-Python backend) nothing changes. The special-token layout is
read from the tokenizer itself: a placeholder id is encoded with special tokens, and whatever surrounds it is
what the tokenizer adds (the same probe radgraph's AllenNLP code uses), so any template post-processor works.
"""

from __future__ import annotations


def _encode_plus(self, text, text_pair=None, **kwargs):
    """``tokenizer(text, text_pair, **kwargs)`` for one example (transformers 4 semantics)."""
    if not isinstance(text, str) or (text_pair is not None and not isinstance(text_pair, str)):
        raise TypeError("encode_plus (compatibility shim) takes single strings; call the tokenizer for batches")
    return self(text, text_pair, **kwargs)


def _special_token_layout(tokenizer) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """(single_start, single_end, pair_start, pair_mid, pair_end) special ids, probed once per tokenizer."""
    cached = getattr(tokenizer, "_radvlm_special_layout", None)
    if cached is not None:
        return cached
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_ids)
    # two ordinary vocabulary entries that encode to exactly themselves
    probes = [tok for tok, idx in sorted(vocab.items(), key=lambda kv: kv[1]) if idx not in special and tok.isalpha()]
    a_text, b_text = probes[0], probes[1]
    a = tokenizer(a_text, add_special_tokens=False)["input_ids"]
    b = tokenizer(b_text, add_special_tokens=False)["input_ids"]
    single = tokenizer(a_text, add_special_tokens=True)["input_ids"]
    pair = tokenizer(a_text, b_text, add_special_tokens=True)["input_ids"]
    ia = single.index(a[0])
    pa, pb = pair.index(a[0]), pair.index(b[0])
    layout = (
        single[:ia],
        single[ia + len(a):],
        pair[:pa],
        pair[pa + len(a):pb],
        pair[pb + len(b):],
    )
    try:
        tokenizer._radvlm_special_layout = layout
    except AttributeError:  # a tokenizer that forbids new attributes: probe again next time
        pass
    return layout


def _build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
    """``[start] ids_0 [end]`` or ``[start] ids_0 [mid] ids_1 [end]`` with this tokenizer's special tokens."""
    s_start, s_end, p_start, p_mid, p_end = _special_token_layout(self)
    if token_ids_1 is None:
        return list(s_start) + list(token_ids_0) + list(s_end)
    return list(p_start) + list(token_ids_0) + list(p_mid) + list(token_ids_1) + list(p_end)


def apply() -> None:
    """Add the missing methods to ``PreTrainedTokenizerBase`` (idempotent; no-op where they exist)."""
    # imported here so that importing the metrics package does not need transformers
    from transformers import PreTrainedTokenizerBase

    if not hasattr(PreTrainedTokenizerBase, "encode_plus"):
        PreTrainedTokenizerBase.encode_plus = _encode_plus
    if not hasattr(PreTrainedTokenizerBase, "build_inputs_with_special_tokens"):
        PreTrainedTokenizerBase.build_inputs_with_special_tokens = _build_inputs_with_special_tokens
