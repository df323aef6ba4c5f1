"""Synthetic chest phantom: determinism, RadVLM format, box/answer agreement, statistics, learnability."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from datamodules.phantom import (
    FINDINGS,
    N_FINDINGS_PROBS,
    main,
    render_case,
    sample_case,
    write_phantom,
)
from datamodules.phantom import PHANTOM_TASKS as TASKS
from datamodules.phantom_text import (
    NORMAL_GROUNDING,
    format_box,
    format_boxes,
    phantom_text_corpus,
    words,
)
from datamodules.records import load_records
from metrics.boxes import format_boxes as metric_format_boxes
from metrics.boxes import parse_boxes
from radvlm.chat import split_thinking

OPACITIES = ("pleural effusion", "consolidation", "nodule", "mass")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("phantom")
    return out, write_phantom(out, n=40, seed=0, size=128)


def _raw(out: Path, name: str) -> list[dict]:
    return json.loads((out / name).read_text(encoding="utf-8"))


def _all_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- formatting


def test_format_box_matches_radvlm_number_style():
    assert format_box([0.12, 0.3, 0.5, 0.71]) == "[0.12, 0.3, 0.5, 0.71]"
    # 0.125 is exact in binary and rounds half to even → 0.12; 1 → 1.0; 0.999 → 1.0
    assert format_box([0.125, 1, 0, 0.999]) == "[0.12, 1.0, 0.0, 1.0]"
    three = [[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.6, 0.6], [0.0, 0.0, 1.0, 1.0]]
    assert format_boxes(three) == "[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.6, 0.6] and [0.0, 0.0, 1.0, 1.0]"
    assert format_boxes(three[:2]) == "[0.1, 0.2, 0.3, 0.4] and [0.5, 0.5, 0.6, 0.6]"
    assert format_boxes([]) == ""
    rng = np.random.default_rng(0)
    boxes = rng.uniform(0, 1, (50, 4)).tolist()
    assert format_boxes(boxes) == metric_format_boxes(boxes)  # the metric parser sees the same text


# ------------------------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path):
    write_phantom(tmp_path / "a", n=12, seed=3, size=64)
    write_phantom(tmp_path / "b", n=12, seed=3, size=64, workers=2)  # parallel rendering: the same bytes
    write_phantom(tmp_path / "c", n=12, seed=4, size=64)
    a, b, c = _all_files(tmp_path / "a"), _all_files(tmp_path / "b"), _all_files(tmp_path / "c")
    assert len(a) == 12 + 7 and a == b  # 12 PNGs, 6 split files, meta.json
    assert a["train.json"] != c["train.json"]
    assert sum(a[k] != c[k] for k in a if k.startswith("images/")) == 12


def test_image_i_does_not_depend_on_n(tmp_path: Path):
    write_phantom(tmp_path / "small", n=5, seed=1, size=64)
    write_phantom(tmp_path / "large", n=9, seed=1, size=64)
    small, large = _all_files(tmp_path / "small"), _all_files(tmp_path / "large")
    assert all(small[k] == large[k] for k in small if k.startswith("images/"))


def test_splits_are_by_image_80_10_10(tmp_path: Path):
    meta = write_phantom(tmp_path, n=20, seed=0, size=64)
    assert meta["images"] == {"train": 16, "val": 2, "test": 2}  # round(0.8 * 20), round(0.9 * 20) - 16
    images = {s: {r["image"] for r in _raw(tmp_path, f"{s}.json")} for s in ("train", "val", "test")}
    assert [len(images[s]) for s in ("train", "val", "test")] == [16, 2, 2]
    assert not (images["train"] & images["val"]) and not (images["train"] & images["test"])
    assert not (images["val"] & images["test"])
    for s in ("train", "val", "test"):
        assert {r["image"] for r in _raw(tmp_path, f"{s}_thinking.json")} == images[s]


def test_write_phantom_refuses_bad_arguments(tmp_path: Path):
    with pytest.raises(ValueError, match="size >= 64"):
        write_phantom(tmp_path, n=2, size=32)
    with pytest.raises(ValueError, match="summing to 1"):
        write_phantom(tmp_path, n=2, splits=(0.5, 0.5, 0.5))


def test_cli_writes_the_dataset_and_the_corpus(tmp_path: Path, capsys):
    main([str(tmp_path / "d"), "--n", "3", "--seed", "2", "--size", "64", "--corpus-out", str(tmp_path / "c.txt")])
    lines = (tmp_path / "c.txt").read_text(encoding="utf-8").splitlines()
    assert "No acute cardiopulmonary process." in lines and "</think>" in lines and all(x.strip() for x in lines)
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert (meta["n"], meta["seed"], meta["size"]) == (3, 2, 64)
    assert len(list((tmp_path / "d" / "images").glob("*.png"))) == 3
    assert json.loads(capsys.readouterr().out)["n"] == 3


# ------------------------------------------------------------------------------------------------ format


def test_every_record_loads_with_image_checks_and_matches_meta(dataset):
    out, meta = dataset
    for split in ("train", "val", "test"):
        for suffix, key in (("", "records"), ("_thinking", "thinking_records")):
            recs = load_records(out / f"{split}{suffix}.json", check_images=True)
            assert Counter(r.task for r in recs) == {t: c for t, c in meta[key][split].items() if c}
            assert all(r.image.is_file() and r.image.suffix == ".png" for r in recs)
    assert sum(meta["findings_per_image"].values()) == 40 == sum(meta["images"].values())


def test_each_image_has_every_task_and_phrase_grounding_only_with_findings(dataset):
    out, _ = dataset
    by_image: dict[str, dict[str, dict]] = {}
    for split in ("train", "val", "test"):
        for r in _raw(out, f"{split}.json"):
            assert r["id"] == f"{Path(r['image']).stem}-{r['task']}"
            by_image.setdefault(r["image"], {})[r["task"]] = r
    for tasks in by_image.values():
        has_findings = bool(tasks["abnormality_grounding"]["boxes"])
        assert set(tasks) == set(TASKS) - (set() if has_findings else {"phrase_grounding"})


def test_image_tag_only_at_start_of_first_human_turn(dataset):
    out, _ = dataset
    for r in _raw(out, "train.json") + _raw(out, "train_thinking.json"):
        conv = r["conversations"]
        assert conv[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in conv) == 1
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)


def test_answer_boxes_parse_back_to_the_boxes_key_exactly(dataset):
    out, _ = dataset
    n_checked = 0
    for r in _raw(out, "train.json") + _raw(out, "test.json"):
        said = parse_boxes(" ".join(t["value"] for t in r["conversations"] if t["from"] == "gpt"))
        if "boxes" in r:
            assert said == [tuple(b) for b in r["boxes"]], r["id"]
            n_checked += bool(said)
        else:
            assert said == [] and r["task"] in ("report_generation", "abnormality_classification", "conversation")
        for x1, y1, x2, y2 in r.get("boxes", []):
            assert 0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0
            assert all(round(v, 2) == v for v in (x1, y1, x2, y2))
    assert n_checked > 40


def test_task_answers_follow_radvlm_templates(dataset):
    out, _ = dataset
    recs = _raw(out, "train.json")
    for r in recs:
        answer = r["conversations"][-1]["value"]
        if r["task"] == "abnormality_grounding":
            assert len(r["labels"]) == len(r["boxes"])
            if not r["boxes"]:
                assert answer == NORMAL_GROUNDING
            else:
                assert answer.count(" is located at the coordinates ") == len(r["boxes"])
        elif r["task"] == "abnormality_classification":
            assert answer == ", ".join(r["labels"])
        elif r["task"] == "phrase_grounding":
            assert answer.startswith("This phrase can be observed at [") and answer.endswith("] on the image.")
        elif r["task"] == "conversation":
            assert len(r["conversations"]) in (4, 6)
    lengths = [len(r["conversations"][1]["value"]) for r in recs if r["task"] == "report_generation"]
    assert 100 <= np.mean(lengths) <= 300 and min(lengths) >= 60 and max(lengths) <= 400


def test_thinking_records_wrap_the_same_answers(dataset):
    out, _ = dataset
    for split in ("train", "test"):
        plain = {r.id: r for r in load_records(out / f"{split}.json", check_images=False)}
        think = load_records(out / f"{split}_thinking.json", check_images=False)
        assert len(think) == len(plain)
        for t in think:
            p = plain[t.id.removesuffix("-think")]
            assert t.is_thinking and not p.is_thinking
            assert (t.image, t.task, t.boxes, t.labels) == (p.image, p.task, p.boxes, p.labels)
            for tt, pt in zip(t.conversations, p.conversations, strict=True):
                if pt.role == "user":
                    assert tt.text == pt.text + " /think"
                else:
                    trace, answer, closed = split_thinking(tt.text)
                    assert closed and answer == pt.text and len(trace) > 20
                    assert tt.text.startswith("<think>\n") and tt.text.endswith("</think>\n\n" + pt.text)


def test_text_corpus_covers_every_word_of_the_dataset(dataset):
    out, _ = dataset
    vocab = {w for text in phantom_text_corpus() for w in words(text)}
    used = {w for name in ("train.json", "train_thinking.json", "val.json", "test_thinking.json")
            for r in _raw(out, name) for t in r["conversations"] for w in words(t["value"])}
    assert used <= vocab, sorted(used - vocab)
    assert {"right", "lingula", "pneumothorax", "0.71", "1.0", "<", ">", "/"} <= vocab


# ------------------------------------------------------------------------------------------- statistics


def test_finding_statistics():
    n = 4000
    cases = [sample_case(np.random.default_rng([11, 0, i]))[1] for i in range(n)]
    counts = np.bincount([len(fs) for fs in cases], minlength=4) / n
    # binomial std for p = 0.35 with n = 4000: sqrt(0.35 * 0.65 / 4000) = 0.0075; tolerance 0.025 ≈ 3.3 std
    assert np.allclose(counts, N_FINDINGS_PROBS, atol=0.025), counts
    kinds = Counter(f.kind for fs in cases for f in fs)
    assert set(kinds) == set(FINDINGS) and min(kinds.values()) > 0.05 * n
    for fs in cases:
        assert len({f.kind for f in fs}) == len(fs)  # distinct kinds
        focal = [(f.side, f.zone) for f in fs if f.zone is not None]
        assert len(set(focal)) == len(focal)  # distinct (side, zone) slots
        assert all(f.zone == "lower" for f in fs if f.kind == "pleural effusion")
        assert all(f.zone == "upper" for f in fs if f.kind == "pneumothorax")
    sided = [f for fs in cases for f in fs if f.side is not None]
    assert 0.45 < np.mean([f.side == "right" for f in sided]) < 0.55
    # alpha ~ U(0.35, 1): P(alpha < 0.5) = 0.15 / 0.65 = 0.23
    assert abs(np.mean([f.alpha < 0.5 for f in sided]) - 0.23) < 0.03


# ------------------------------------------------------------------------------------------ learnability


@pytest.fixture(scope="module")
def rendered():
    out = []
    for i in range(360):
        anat, findings = sample_case(np.random.default_rng([7, 0, i]))
        pixels, boxes, regions = render_case(anat, findings, 128, np.random.default_rng([7, 1, i]))
        out.append((findings, boxes, regions, pixels.astype(np.float64)))
    return out


def _mean_in(img: np.ndarray, box) -> float:
    x1, y1, x2, y2 = (round(v * img.shape[0]) for v in box)
    return float(img[y1:y2, x1:x2].mean())


def _normalise(img: np.ndarray) -> np.ndarray:
    """Undo the per-image brightness jitter from pixels alone: 0 = the air in the top-left corner,
    100 = the abdomen below the diaphragm (no finding reaches either)."""
    air, abdomen = img[:8, :8].mean(), img[109:122, 51:77].mean()
    return (img - air) / (abdomen - air) * 100.0


def test_all_rendered_boxes_are_valid(rendered):
    for findings, boxes, regions, img in rendered:
        assert img.shape == (128, 128) and 0 <= img.min() and img.max() <= 255
        assert len(boxes) == len(findings)
        for x1, y1, x2, y2 in list(boxes) + list(regions.values()):
            assert 0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0


def test_findings_change_the_mean_intensity_inside_their_box(rendered):
    """Against the same box in normal images (brightness-normalised): opacities brighten it, a pneumothorax
    darkens it."""
    images = [(findings, boxes, _normalise(img)) for findings, boxes, _, img in rendered]
    normals = [img for findings, _, img in images if not findings][:30]
    diffs: dict[str, list[tuple[float, float]]] = {k: [] for k in FINDINGS}
    for findings, boxes, img in images:
        for f, box in zip(findings, boxes):
            reference = np.median([_mean_in(n, box) for n in normals])
            diffs[f.kind].append((_mean_in(img, box) - reference, f.alpha))
    for kind in OPACITIES + ("cardiomegaly",):
        d = np.array(diffs[kind])[:, 0]
        assert len(d) > 25 and d.min() > 0 and np.median(d) > 15, (kind, np.percentile(d, [0, 50]))
    d = np.array(diffs["pneumothorax"])[:, 0]
    assert len(d) > 25 and np.mean(d < 0) >= 0.95 and np.median(d) < -5, np.percentile(d, [50, 95])
    # faint findings (alpha < 0.5) are visibly weaker than strong ones (alpha > 0.8): headroom for RL
    pooled = np.array([x for k in OPACITIES for x in diffs[k]])
    assert np.median(pooled[pooled[:, 1] < 0.5, 0]) < 0.6 * np.median(pooled[pooled[:, 1] > 0.8, 0])


def test_heart_width_separates_cardiomegaly(rendered):
    """Width of the bright central band at heart level, from pixels only, in images whose lower zones hold
    no other opacity: every enlarged heart is wider than every normal one."""

    def width(img: np.ndarray) -> float:  # (128, 128) → fraction of the image width
        strip = img[int(0.52 * 128):int(0.62 * 128), int(0.2 * 128):int(0.8 * 128)]
        threshold = (np.percentile(strip, 10) + np.percentile(strip, 90)) / 2
        return float(np.median((strip > threshold).sum(axis=1)) / 128)

    clean = [(fs, img) for fs, _, _, img in rendered if not {f.kind for f in fs} & {"pleural effusion",
                                                                                  "consolidation", "mass"}]
    big = [width(img) for fs, img in clean if any(f.kind == "cardiomegaly" for f in fs)]
    normal = [width(img) for fs, img in clean if not any(f.kind == "cardiomegaly" for f in fs)]
    assert len(big) > 20 and len(normal) > 60
    assert min(big) > max(normal), (min(big), max(normal))
