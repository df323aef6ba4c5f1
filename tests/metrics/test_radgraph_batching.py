"""RadGraph in batches (metrics/radgraph_annotate.py, metrics/radgraph.py): reports of similar length share a
forward as the sentences of one document, and every report's annotation and score equal its own one-report
forward; word pieces are kept per distinct word and equal the package's word-by-word tokenization; a failing
batch is redone report by report; the model's inputs are built directly, equal to the package's reader and
collation; the calibrated tiny model (metrics/tiny.py) predicts sparsely and still scores as the package does."""

import pytest
import torch

from metrics.radgraph import RadGraphF1, load_annotator
from metrics.radgraph_annotate import (
    WordPieces,
    annotate_words,
    install_word_pieces,
    length_batches,
    model_inputs,
    report_spans,
    report_words,
)
from metrics.tiny import calibrate_label_scorer, calibrate_tiny_radgraph, write_tiny_radgraph

# mixed lengths: one word, short, medium and one long report (cut to max_tokens=64 word pieces below)
MIXED = [
    "Cardiomegaly.",
    "No pleural effusion.",
    "Mild cardiomegaly with left lower lobe atelectasis and a small right pleural effusion.",
    "The heart size is normal. The mediastinal and hilar contours are unremarkable. " * 6,
    "Right lower lobe pneumonia, improved from prior.",
    "Small left apical pneumothorax. Endotracheal tube terminates 4 cm above the carina.",
    "Stable appearance of the chest.",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, bert_dir):
    return write_tiny_radgraph(tmp_path_factory.mktemp("rgbatch") / "radgraph-xl", bert_dir)


def test_length_batches_by_hand():
    lengths = [5, 1, 9, 3, 1, 7]
    # sorted by length, ties in input order: 1 (idx 1), 1 (idx 4), 3 (idx 3), 5 (idx 0), 7 (idx 5), 9 (idx 2)
    assert length_batches(lengths, 2) == [[1, 4], [3, 0], [5, 2]]
    assert length_batches(lengths, 4) == [[1, 4, 3, 0], [5, 2]]
    assert length_batches(lengths, 1) == [[1], [4], [3], [0], [5], [2]]
    # widths: a batch stops before len(batch) * max(width)^2 passes max_pairs = 100
    # idx 1 (w 2) + idx 4 (w 2): 2 * 4 = 8 ok; + idx 3 (w 6): 3 * 36 = 108 > 100, a new batch; idx 3 + idx 0 (w 5):
    # 2 * 36 = 72 ok; + idx 5 (w 8): 3 * 64 = 192 no; idx 5 + idx 2 (w 10): 2 * 100 = 200 no; each alone
    widths = [5, 2, 10, 6, 2, 8]
    assert length_batches(lengths, 8, widths, max_pairs=100) == [[1, 4], [3, 0], [5], [2]]
    assert length_batches([], 4) == []
    with pytest.raises(ValueError, match="batch_size"):
        length_batches([1], 0)


@pytest.mark.parametrize("level", ["partial", "radcliq"])
def test_batched_scores_equal_one_report_per_forward(folder, level):
    preds = MIXED
    refs = MIXED[3:] + MIXED[:3]
    batched = RadGraphF1(reward_level=level, model_dir=folder, device="cpu", max_tokens=64, batch_size=16)
    single = RadGraphF1(reward_level=level, model_dir=folder, device="cpu", max_tokens=64, batch_size=1)
    b, s = batched.score(preds, refs), single.score(preds, refs)
    assert not torch.isnan(b).any()
    torch.testing.assert_close(b, s, rtol=0, atol=0)
    assert 0 < float(b.mean()) < 1  # a random tiny model: some, not all, entities shared
    # the annotations themselves, not only the scores: every entity, label and relation
    ann_b = RadGraphF1(model_dir=folder, device="cpu", max_tokens=64, batch_size=3).annotate(preds, refs)
    ann_s = RadGraphF1(model_dir=folder, device="cpu", max_tokens=64, batch_size=1).annotate(preds, refs)
    assert ann_b == ann_s
    assert any(a and a["entities"] for a in ann_b.values())


def test_one_forward_of_several_reports_equals_each_alone(folder):
    annotator = load_annotator("radgraph-xl", folder, "cpu")
    words = [report_words(annotator, text, 64)[0] for text in MIXED]
    together = annotate_words(annotator, words)
    alone = [annotate_words(annotator, [w])[0] for w in words]
    assert together == alone
    assert len(words[3]) < len(MIXED[3].split())  # the long report was cut to 64 word pieces


def test_word_pieces_equal_the_tokenizer_word_by_word(folder):
    annotator = load_annotator("radgraph-xl", folder, "cpu")
    tokenizer = annotator.reader._token_indexers["bert"]._tokenizer
    words = "the heart xyzzy is normal , the heart".split()
    pieces = WordPieces(tokenizer, max_words=4)
    expected = [tuple(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in words]
    assert pieces(words) == expected  # 6 distinct words > max_words: the table starts over, answers stay right
    assert pieces(words[:2]) == expected[:2]
    # the installed intra_word_tokenize gives the package's word pieces, offsets and type ids
    wrapper = annotator.reader._token_indexers["bert"]._allennlp_tokenizer
    install_word_pieces(annotator)
    ours_tokens, ours_offsets = wrapper.intra_word_tokenize(words)
    ref_tokens, ref_offsets = type(wrapper).intra_word_tokenize(wrapper, words)  # the package's own method
    assert ours_offsets == ref_offsets
    assert [(t.text, t.text_id, t.type_id) for t in ours_tokens] == [(t.text, t.text_id, t.type_id) for t in ref_tokens]


def test_a_failing_batch_is_redone_report_by_report(folder, monkeypatch):
    import metrics.radgraph as rg

    real = rg.annotate_words
    bad = report_words(load_annotator("radgraph-xl", folder, "cpu"), MIXED[1], 64)[0]

    def flaky(annotator, reports):
        if bad in reports:
            raise RuntimeError("planted failure")
        return real(annotator, reports)

    monkeypatch.setattr(rg, "annotate_words", flaky)
    metric = RadGraphF1(model_dir=folder, device="cpu", max_tokens=64, batch_size=16)
    with pytest.warns(RuntimeWarning, match="planted failure"):
        values = metric.score(MIXED, MIXED)
    assert torch.isnan(values[1]) and not torch.isnan(values[[0, 2, 3, 4, 5, 6]]).any()
    strict = RadGraphF1(model_dir=folder, device="cpu", max_tokens=64, batch_size=16, strict=True)
    with pytest.raises(RuntimeError, match="planted failure"):
        strict.score(MIXED, MIXED)


def test_report_spans_by_hand():
    # 3 words, spans of at most 2 words, by start then end (the package's enumerate_spans order)
    assert report_spans(3, 2).tolist() == [[0, 0], [0, 1], [1, 1], [1, 2], [2, 2]]
    assert report_spans(1, 8).tolist() == [[0, 0]]
    # n·w − w(w−1)/2 spans: 10 words, width 8 -> 80 − 28 = 52
    assert report_spans(10, 8).shape == (52, 2)


def test_model_inputs_equal_the_packages_reader_and_collation(folder):
    from radgraph.allennlp.data.dataloader import PyTorchDataLoader
    from radgraph.allennlp.data.dataset_readers import AllennlpDataset

    annotator = load_annotator("radgraph-xl", folder, "cpu")
    install_word_pieces(annotator)
    texts = MIXED + ["Stable /. lines and tubes /?"]  # words the reader normalizes ("/." -> ".")
    reports = [report_words(annotator, text, 64)[0] for text in texts]
    instance = annotator.reader.text_to_instance({"doc_key": "0", "sentences": reports, "dataset": "radgraph-xl"})
    data = AllennlpDataset([instance])
    data.index_with(annotator.model.vocab)
    (expected,) = list(PyTorchDataLoader(batch_size=1, dataset=data))
    ours = model_inputs(annotator, reports)
    assert set(ours["text"]["bert"]) == set(expected["text"]["bert"])
    for key, value in expected["text"]["bert"].items():
        assert ours["text"]["bert"][key].dtype == value.dtype, key
        assert torch.equal(ours["text"]["bert"][key], value), key
    assert torch.equal(ours["spans"], expected["spans"])
    assert (ours["spans"] == -1).any()  # shorter reports were padded
    doc, ref_doc = ours["metadata"][0], expected["metadata"][0]
    assert doc.dataset == ref_doc.dataset == "radgraph-xl"
    assert [s.text for s in doc.sentences] == [s.text for s in ref_doc.sentences]


def test_calibrate_label_scorer_by_hand():
    # an identity scorer: logits are the inputs; after calibration scale·(x − mean) − t with t the 0.75 quantile
    # of the centred row maxima, so a quarter of the rows have a label above 0
    x = torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 3.0], [4.0, 2.0], [3.0, 1.0], [0.0, 0.0], [1.0, 1.0], [2.0, 5.0]])
    linear = torch.nn.Linear(2, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(2))
        linear.bias.zero_()
    calibrate_label_scorer(linear, linear(x).detach(), rate=0.25, scale=2.0)
    mean = x.mean(dim=0)  # (1.625, 1.625)
    centred = 2.0 * (x - mean)
    t = torch.quantile(centred.max(dim=1).values, 0.75)
    torch.testing.assert_close(linear(x).detach(), centred - t)
    assert int((linear(x).max(dim=1).values > 0).sum()) == 2  # 2 of 8 rows


def test_calibrated_tiny_radgraph_is_sparse_and_scores_as_the_package(tmp_path, bert_dir):
    from radgraph import F1RadGraph

    folder = write_tiny_radgraph(tmp_path / "radgraph-xl", bert_dir)
    density = calibrate_tiny_radgraph(folder, MIXED * 3)
    # a random model labels most of the ~8 enumerated spans per word; the calibrated one about one word in two
    assert 0.1 < density["entities_per_word"] < 1.5 and 0 < density["relations_per_word"] < 1.5
    model = load_annotator("radgraph-xl", folder, "cpu").model
    saved = torch.load(f"{folder}/weights.th", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())  # the rewritten weights
    preds, refs = MIXED, MIXED[2:] + MIXED[:2]
    ours = RadGraphF1(reward_level="partial", model_dir=folder, device="cpu", batch_size=4).score(preds, refs)
    _, package, _, _ = F1RadGraph(reward_level="partial", model_type="radgraph-xl", model_cache_dir=str(tmp_path),
                                  cuda=-1)(refs=refs, hyps=preds)
    torch.testing.assert_close(ours, torch.tensor(package, dtype=torch.float32), rtol=0, atol=0)
