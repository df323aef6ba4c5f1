"""RadGraph rewards (metrics/radgraph.py): feature by hand, the package's own scores on a tiny real-format
model folder, reference caching, missing weights, and the transformers-5 tokenizer shims."""

import warnings

import pytest
import torch

from metrics import _compat
from metrics.radgraph import RadGraphF1, entity_relation_sets, radgraph_feature, set_f1
from metrics.tiny import write_tiny_radgraph

REPORTS = [
    "The heart size is normal. No pleural effusion.",
    "Mild cardiomegaly with left lower lobe atelectasis.",
    "Small right pleural effusion, unchanged from prior.",
    "No acute cardiopulmonary process.",
    "Right lower lobe pneumonia.",
]


@pytest.fixture(scope="module")
def model_root(tmp_path_factory, bert_dir):
    root = tmp_path_factory.mktemp("radgraph")
    write_tiny_radgraph(root / "radgraph-xl", bert_dir)  # the package reads <cache_dir>/<model_type>/
    return root


def annotation(*entities):
    """{"entities": {"1": {...}, ...}} from (tokens, label, [(relation, target id), ...]) triples."""
    return {"text": "", "entities": {
        str(i + 1): {"tokens": tok, "label": lab, "relations": [[r, str(t)] for r, t in rels]}
        for i, (tok, lab, rels) in enumerate(entities)
    }}


def test_radgraph_feature_by_hand():
    pred = annotation(
        ("effusion", "OBS-DP", [("located_at", 2)]),
        ("pleural", "ANAT-DP", []),
        ("cardiomegaly", "OBS-DP", []),
    )
    ref = annotation(
        ("effusion", "OBS-DP", [("located_at", 2)]),
        ("pleural", "ANAT-DP", []),
        ("edema", "OBS-DP", []),
        ("cardiomegaly", "OBS-U", []),
    )
    # entities: pred {effusion/OBS-DP, pleural/ANAT-DP, cardiomegaly/OBS-DP}, ref {effusion, pleural, edema,
    # cardiomegaly/OBS-U}: 2 shared, P = 2/3, R = 2/4, F1 = 2 * (2/3) * (1/2) / (2/3 + 1/2) = (2/3) / (7/6) = 4/7
    # relations: one each, identical ((effusion, OBS-DP), (pleural, ANAT-DP), located_at): F1 = 1
    # feature = (4/7 + 1) / 2 = 11/14
    assert radgraph_feature(pred, ref) == pytest.approx(11 / 14)
    ents, rels = entity_relation_sets(pred)
    assert rels == {(("effusion", "OBS-DP"), ("pleural", "ANAT-DP"), "located_at")}
    assert len(ents) == 3


def test_feature_is_zero_for_empty_annotations():
    some = annotation(("edema", "OBS-DP", []))
    empty = annotation()
    # entities match (F1 1) but neither side has a relation (F1 0): (1 + 0) / 2
    assert radgraph_feature(some, some) == pytest.approx(0.5)
    assert radgraph_feature(empty, some) == 0.0
    assert radgraph_feature(empty, empty) == 0.0
    assert set_f1(set(), {1}) == 0.0 and set_f1({1, 2}, {2, 3}) == pytest.approx(0.5)


@pytest.mark.parametrize("level", ["simple", "partial", "complete"])
def test_rewards_equal_the_packages_f1radgraph(model_root, level):
    from radgraph import F1RadGraph

    preds = REPORTS
    refs = REPORTS[1:] + REPORTS[:1]
    ours = RadGraphF1(reward_level=level, model_dir=str(model_root / "radgraph-xl"), device="cpu").score(preds, refs)
    _, package, _, _ = F1RadGraph(reward_level=level, model_type="radgraph-xl", model_cache_dir=str(model_root),
                                  cuda=-1)(refs=refs, hyps=preds)
    torch.testing.assert_close(ours, torch.tensor(package, dtype=torch.float32))


def test_radcliq_level_is_the_feature_of_the_packages_annotations(model_root):
    from radgraph import RadGraph

    annotate = RadGraph(model_type="radgraph-xl", model_cache_dir=str(model_root), cuda=-1)
    preds, refs = REPORTS, REPORTS[2:] + REPORTS[:2]
    ann = annotate(preds + refs)
    expected = [radgraph_feature(ann[str(i)], ann[str(i + len(preds))]) for i in range(len(preds))]
    metric = RadGraphF1(reward_level="radcliq", model_dir=str(model_root / "radgraph-xl"), device="cpu")
    torch.testing.assert_close(metric.score(preds, refs), torch.tensor(expected, dtype=torch.float32))
    same = metric.score(REPORTS, REPORTS)  # random tiny model: still some entities and relations per report
    torch.testing.assert_close(same, torch.ones(len(REPORTS)))


def test_empty_prediction_scores_zero_not_nan(model_root):
    metric = RadGraphF1(reward_level="partial", model_dir=str(model_root / "radgraph-xl"), device="cpu")
    torch.testing.assert_close(metric.score(["", "  "], REPORTS[:2]), torch.zeros(2))


def test_model_folder_of_any_name_loads(tmp_path, bert_dir, model_root):
    other = write_tiny_radgraph(tmp_path / "my-weights", bert_dir)
    a = RadGraphF1(model_dir=other, device="cpu").score(REPORTS, REPORTS[::-1])
    b = RadGraphF1(model_dir=str(model_root / "radgraph-xl"), device="cpu").score(REPORTS, REPORTS[::-1])
    torch.testing.assert_close(a, b)  # same seed, same random weights


def test_reference_annotated_once_per_distinct_reference(model_root):
    metric = RadGraphF1(reward_level="radcliq", model_dir=str(model_root / "radgraph-xl"), device="cpu")
    refs = [f"Small effusion, study {i}." for i in range(8)]  # short texts keep the tiny model fast
    targets = [refs[i // 8] for i in range(64)]  # 8 prompts x 8 rollouts
    preds = [f"Mild edema, rollout {i}-{j}." for i in range(8) for j in range(8)]
    first = metric.score(preds, targets)
    assert metric.stats["reference_annotations"] == 8
    assert metric.stats["prediction_annotations"] == 64
    torch.testing.assert_close(metric.score(preds[::8], targets[::8]), first[::8])
    assert metric.stats["reference_annotations"] == 8  # second call served by the reference cache


def test_update_on_halves_equals_update_on_whole(model_root):
    folder = str(model_root / "radgraph-xl")
    whole, halves = RadGraphF1(model_dir=folder, device="cpu"), RadGraphF1(model_dir=folder, device="cpu")
    refs = REPORTS[::-1]
    whole.update(REPORTS, refs)
    halves.update(REPORTS[:2], refs[:2])
    halves.update(REPORTS[2:], refs[2:])
    torch.testing.assert_close(whole.compute(), halves.compute())
    assert list(whole.state_dict().keys()) == [] and list(whole.modules()) == [whole]


def test_missing_weights_give_nan_and_say_where_to_put_them(tmp_path):
    folder = str(tmp_path / "absent" / "radgraph-xl")
    metric = RadGraphF1(model_dir=folder, device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = metric.score(REPORTS[:2], REPORTS[:2])
        metric.score(REPORTS[:2], REPORTS[:2])
    assert torch.isnan(values).all()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert folder in messages[0] and "weights.th" in messages[0] and "StanfordAIMI/RRG_scorers" in messages[0]
    with pytest.raises(RuntimeError, match="could not be loaded"):
        RadGraphF1(model_dir=folder, device="cpu", strict=True).score(["a b"], ["c d"])


def test_bad_arguments_fail_early():
    with pytest.raises(ValueError, match="model_type must be one of"):
        RadGraphF1(model_type="radgraph-xxl")
    with pytest.raises(ValueError, match="unknown reward_level"):
        RadGraphF1(reward_level="all")


def test_compat_restores_removed_tokenizer_methods(bert_dir):
    from transformers import AutoTokenizer

    _compat.apply()
    tok = AutoTokenizer.from_pretrained(bert_dir)
    ids = tok("pleural effusion", add_special_tokens=False)["input_ids"]
    assert tok.build_inputs_with_special_tokens(ids) == [tok.cls_token_id] + ids + [tok.sep_token_id]
    assert tok.build_inputs_with_special_tokens(ids, ids) == (
        [tok.cls_token_id] + ids + [tok.sep_token_id] + ids + [tok.sep_token_id]
    )
    assert tok.build_inputs_with_special_tokens([]) == [tok.cls_token_id, tok.sep_token_id]
    assert tok.encode_plus("no edema", add_special_tokens=True)["input_ids"] == tok("no edema")["input_ids"]
    with pytest.raises(TypeError, match="single strings"):
        tok.encode_plus(["a", "b"])
