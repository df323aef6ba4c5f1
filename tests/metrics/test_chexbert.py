"""CheXbert (metrics/chexbert.py): real checkpoint format, labels and embeddings, F1 aggregation by hand,
similarity, caching and missing weights."""

import warnings

import pytest
import torch

from metrics.chexbert import (
    CONDITIONS,
    SUBSET_5_INDEX,
    CheXbert,
    CheXbertF1,
    CheXbertModel,
    CheXbertSimilarity,
    load_state,
    micro_macro_f1,
    positive,
    sample_f1,
)
from metrics.tiny import write_tiny_chexbert

REPORTS = [
    "No acute cardiopulmonary process.",
    "Mild cardiomegaly with pulmonary edema.",
    "Small left pleural effusion and bibasilar atelectasis.",
    "Right lower lobe consolidation concerning for pneumonia.",
    "Small apical pneumothorax on the right.",
    "",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, bert_dir):
    return write_tiny_chexbert(tmp_path_factory.mktemp("chexbert") / "chexbert.pth", bert_dir)


@pytest.fixture(scope="module")
def chexbert(ckpt, bert_dir):
    return CheXbert(ckpt, bert_dir, device="cpu", batch_size=4)


def test_checkpoint_has_the_public_layout(ckpt):
    state = torch.load(ckpt, weights_only=True)["model_state_dict"]
    assert all(k.startswith("module.") for k in state)
    assert "module.bert.embeddings.word_embeddings.weight" in state
    assert "module.bert.pooler.dense.weight" in state
    heads = {k for k in state if k.startswith("module.linear_heads.")}
    assert len(heads) == 28  # 14 heads x (weight, bias)
    assert state["module.linear_heads.0.weight"].shape[0] == 4
    assert state["module.linear_heads.13.weight"].shape[0] == 2


def test_loaded_model_carries_the_checkpoint_weights(ckpt, chexbert):
    saved = load_state(ckpt)
    loaded = chexbert.model.state_dict()
    assert set(saved) == set(loaded)
    for key, value in saved.items():
        torch.testing.assert_close(loaded[key], value)


def test_labels_and_embeddings_equal_a_direct_forward(chexbert):
    labels, emb = chexbert.run(REPORTS)
    assert labels.shape == (len(REPORTS), 14) and labels.dtype == torch.long
    assert emb.shape == (len(REPORTS), chexbert.model.bert.config.hidden_size)
    assert labels[:, :13].max() <= 3 and labels[:, 13].max() <= 1
    for i, text in enumerate(REPORTS):  # one at a time, no padding
        ids = torch.tensor([chexbert.token_ids(text)])
        with torch.no_grad():
            cls, logits = chexbert.model(ids, torch.ones_like(ids))
        torch.testing.assert_close(emb[i], cls[0], atol=1e-5, rtol=1e-5)
        assert labels[i].tolist() == [int(lg.argmax(-1)) for lg in logits]
    torch.testing.assert_close(chexbert.embeddings(REPORTS), emb)
    assert torch.equal(chexbert.labels(REPORTS), labels)


def test_input_is_cut_to_511_tokens_plus_sep(chexbert):
    ids = chexbert.token_ids("pleural effusion " * 400)
    assert len(ids) == 512
    assert ids[0] == chexbert.tokenizer.cls_token_id and ids[-1] == chexbert.tokenizer.sep_token_id
    assert chexbert.token_ids("  ") == [chexbert.tokenizer.cls_token_id, chexbert.tokenizer.sep_token_id]
    assert chexbert.token_ids("no\n\n edema") == chexbert.token_ids("no edema")


def test_stale_position_ids_key_is_tolerated_but_wrong_architecture_is_not(tmp_path, ckpt, bert_dir):
    blob = torch.load(ckpt, weights_only=True)
    blob["model_state_dict"]["module.bert.embeddings.position_ids"] = torch.arange(512)[None]
    ok = tmp_path / "old.pth"
    torch.save(blob, ok)
    CheXbert(str(ok), bert_dir, device="cpu")
    del blob["model_state_dict"]["module.linear_heads.13.bias"]
    bad = tmp_path / "bad.pth"
    torch.save(blob, bad)
    with pytest.raises(ValueError, match="does not match the CheXbert architecture"):
        CheXbert(str(bad), bert_dir, device="cpu")


def test_positive_is_class_1_or_3():
    labels = torch.tensor([[0, 1, 2, 3] + [0] * 9 + [1], [3, 2, 1, 0] + [0] * 10])
    assert positive(labels)[0, :4].tolist() == [False, True, False, True]
    assert positive(labels)[:, 13].tolist() == [True, False]


def test_sample_f1_by_hand():
    pred = torch.zeros(3, 14, dtype=torch.bool)
    ref = torch.zeros(3, 14, dtype=torch.bool)
    pred[0, [1, 4]] = True  # Cardiomegaly, Edema
    ref[0, [1, 9]] = True  # Cardiomegaly, Pleural Effusion
    ref[1, 13] = True  # No Finding in the reference only
    # row 0: TP 1, FP 1, FN 1 -> 2/(2+1+1) = 0.5; row 1: TP 0, FN 1 -> 0; row 2: no positives -> 1
    torch.testing.assert_close(sample_f1(pred, ref), torch.tensor([0.5, 0.0, 1.0]))


def test_micro_macro_f1_by_hand():
    # 3 samples x 2 classes
    pred = torch.tensor([[1, 0], [1, 1], [0, 0]], dtype=torch.bool)
    ref = torch.tensor([[1, 0], [0, 1], [0, 1]], dtype=torch.bool)
    # class 0: TP 1, FP 1, FN 0 -> 2/(2+1) = 2/3; class 1: TP 1, FP 0, FN 1 -> 2/3; macro 2/3
    # micro: TP 2, FP 1, FN 1 -> 4/(4+2) = 2/3
    micro, macro = micro_macro_f1(pred, ref)
    assert micro.item() == pytest.approx(2 / 3) and macro.item() == pytest.approx(2 / 3)
    # a class never positive on either side counts 0 in the macro mean
    micro, macro = micro_macro_f1(torch.tensor([[1, 0]], dtype=torch.bool), torch.tensor([[1, 0]], dtype=torch.bool))
    assert micro.item() == 1.0 and macro.item() == 0.5


def test_f1_compute_from_known_labels(monkeypatch):
    metric = CheXbertF1(checkpoint="unused", device="cpu")
    pred = torch.zeros(2, 14, dtype=torch.long)
    ref = torch.zeros(2, 14, dtype=torch.long)
    pred[0, 1], ref[0, 1] = 1, 3  # Cardiomegaly positive vs uncertain: both positive
    pred[0, 4], ref[0, 4] = 2, 1  # Edema negative vs positive: FN
    pred[1, 2], ref[1, 2] = 1, 1  # Lung Opacity: TP (outside the 5)
    pred[1, 9] = 3  # Pleural Effusion uncertain in the prediction only: FP
    monkeypatch.setattr(metric, "outputs", lambda p, t: (pred, ref, None, None))
    metric.update(["x", "y"], ["x", "y"])
    out = metric.compute()
    # 14: TP 2 (Cardiomegaly, Lung Opacity), FP 1, FN 1 -> micro 4/6; per class F1: Cardiomegaly 1,
    # Lung Opacity 1, Edema 0, Pleural Effusion 0, 10 others 0 -> macro 2/14
    assert out["micro_f1_14"].item() == pytest.approx(4 / 6)
    assert out["macro_f1_14"].item() == pytest.approx(2 / 14)
    # 5: TP 1 (Cardiomegaly), FP 1 (Effusion), FN 1 (Edema) -> micro 2/4; macro (1 + 0 + 0 + 0 + 0)/5
    assert out["micro_f1_5"].item() == pytest.approx(0.5)
    assert out["macro_f1_5"].item() == pytest.approx(0.2)
    # per sample: row 0 TP 1 FN 1 -> 2/3; row 1 TP 1 FP 1 -> 2/3
    torch.testing.assert_close(metric.per_sample(), torch.tensor([2 / 3, 2 / 3]))
    assert SUBSET_5_INDEX == (1, 4, 5, 7, 9) and CONDITIONS[13] == "No Finding"


def test_f1_update_on_halves_equals_update_on_whole(ckpt, bert_dir):
    refs = REPORTS[::-1]
    whole = CheXbertF1(ckpt, bert_dir, device="cpu")
    halves = CheXbertF1(ckpt, bert_dir, device="cpu")
    whole.update(REPORTS, refs)
    halves.update(REPORTS[:3], refs[:3])
    halves.update(REPORTS[3:], refs[3:])
    a, b = whole.compute(), halves.compute()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    torch.testing.assert_close(whole.score(REPORTS, refs), whole.per_sample())
    assert list(whole.state_dict().keys()) == [] and list(whole.modules()) == [whole]


def test_similarity_is_cosine_of_cls_embeddings(ckpt, bert_dir, chexbert):
    metric = CheXbertSimilarity(ckpt, bert_dir, device="cpu")
    refs = REPORTS[1:] + REPORTS[:1]
    emb_p, emb_r = chexbert.embeddings(REPORTS), chexbert.embeddings(refs)
    expected = (emb_p * emb_r).sum(1) / (emb_p.norm(dim=1) * emb_r.norm(dim=1))
    torch.testing.assert_close(metric.score(REPORTS, refs), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metric.score(REPORTS, REPORTS), torch.ones(len(REPORTS)), atol=1e-5, rtol=0)


def test_reference_encoded_once_per_distinct_reference(ckpt, bert_dir):
    metric = CheXbertSimilarity(ckpt, bert_dir, device="cpu")
    refs = [f"{REPORTS[i % 5]} Study {i}." for i in range(8)]
    targets = [refs[i // 8] for i in range(64)]  # 8 prompts x 8 rollouts
    preds = [f"{REPORTS[j % 5]} Rollout {i}-{j}." for i in range(8) for j in range(8)]
    first = metric.score(preds, targets)
    assert metric.stats == {"reference_encodings": 8, "prediction_encodings": 64}
    torch.testing.assert_close(metric.score(preds, targets), first)
    assert metric.stats["reference_encodings"] == 8


def test_missing_checkpoint_gives_nan_and_says_where_to_put_it(tmp_path, bert_dir):
    absent = str(tmp_path / "chexbert.pth")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sim = CheXbertSimilarity(absent, bert_dir, device="cpu").score(REPORTS[:2], REPORTS[:2])
        f1 = CheXbertF1(absent, bert_dir, device="cpu")
        f1.update(REPORTS[:2], REPORTS[:2])
    assert torch.isnan(sim).all() and torch.isnan(f1.per_sample()).all()
    assert all(torch.isnan(v) for v in f1.compute().values())
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1  # one warning per missing model, not per metric or call
    assert absent in messages[0] and "checkpoint=<path>" in messages[0]
    with pytest.raises(RuntimeError, match="CheXbert could not be loaded"):
        CheXbertSimilarity(absent, bert_dir, device="cpu", strict=True).score(["a"], ["b"])


def test_model_class_has_14_heads_on_cls(bert_dir):
    from transformers import AutoConfig

    model = CheXbertModel(AutoConfig.from_pretrained(bert_dir)).eval()
    ids = torch.tensor([[2, 10, 11, 3]])
    cls, logits = model(ids, torch.ones_like(ids))
    assert cls.shape == (1, model.bert.config.hidden_size)
    assert [lg.shape[-1] for lg in logits] == [4] * 13 + [2]
