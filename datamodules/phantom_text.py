"""Text side of the phantom dataset: finding vocabulary, templates, reports, traces, records and the corpus.

Used by `datamodules/phantom.py` (see its docstring for the dataset). Every sentence comes from a template
family in `FAMILIES`, filled from the case (`Finding.slots()`); `phantom_text_corpus()` expands every template
with every slot value in `SLOT_VALUES`, a superset of the words the dataset can produce. Boxes are written as
`metrics/boxes.py` and docs/paper.md §8 write them: `repr(round(x, 2))`, ", " and " and " between boxes.
The thinking format comes from `radvlm.chat`; in a conversation every user turn gets " /think" and every
assistant turn its own trace.
"""

from __future__ import annotations

import itertools
import re
import string
from dataclasses import dataclass

import numpy as np

from datamodules.records import IMAGE_TAG
from radvlm.chat import make_thinking_answer, make_thinking_prompt

FINDINGS = ("cardiomegaly", "pleural effusion", "nodule", "mass", "consolidation", "pneumothorax")
LABELS = {"cardiomegaly": "Cardiomegaly", "pleural effusion": "Pleural Effusion", "nodule": "Nodule",
          "mass": "Mass", "consolidation": "Consolidation", "pneumothorax": "Pneumothorax"}
NO_FINDING = "No Finding"
SIDES = ("right", "left")  # patient sides; image x: right lung on the left
ZONES = ("upper", "middle", "lower")
LOBES = {("right", "upper"): "right upper lobe", ("right", "middle"): "right middle lobe",
         ("right", "lower"): "right lower lobe", ("left", "upper"): "left upper lobe",
         ("left", "middle"): "lingula", ("left", "lower"): "left lower lobe"}
SIZES = ("small", "moderate", "large")
QUALITIES = {"nodule": ("small", "rounded", "well-defined"), "mass": ("large", "rounded", "lobulated"),
             "consolidation": ("patchy", "focal", "dense")}
FAINT = {"nodule": "faint", "mass": "poorly defined", "consolidation": "subtle"}
REGIONS = tuple(f"{s} {z} lung zone" for s in SIDES for z in ("upper", "mid", "lower")) + (
    "right lung", "left lung", "cardiac silhouette", "heart", "upper mediastinum", "trachea",
    "right hemidiaphragm", "left hemidiaphragm", "right costophrenic angle", "left costophrenic angle")
NORMAL_GROUNDING = "No abnormalities or lesions are detected on this Chest X-ray."

# ------------------------------------------------------------------------------------------- templates
# Each family is a tuple of format strings; slots are filled from SLOT_VALUES (corpus) or from the case.
FAMILIES: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("{degree} cardiomegaly.", "The heart is {degree}ly enlarged.",
                     "The cardiac silhouette is {degree}ly enlarged.",
                     "There is {degree} enlargement of the cardiac silhouette."),
    "heart_normal": ("The cardiomediastinal silhouette is within normal limits.", "Heart size is normal.",
                     "The heart is normal in size.", "Normal cardiomediastinal contours.",
                     "The cardiac and mediastinal contours are unremarkable."),
    "pleural effusion": ("{size} {side} pleural effusion.", "There is a {size} {side} pleural effusion.",
                         "{size} {side} pleural effusion with blunting of the costophrenic angle.",
                         "A {size} {side}-sided pleural effusion is present."),
    "pneumothorax": ("{size} {side} apical pneumothorax.", "There is a {size} {side} pneumothorax.",
                     "A {size} {side}-sided pneumothorax is present.",
                     "{size} {side} pneumothorax with a visible pleural line."),
    "nodule": ("There is a {quality} nodule in the {lobe}.", "A {quality} pulmonary nodule projects over the {lobe}.",
               "{quality} nodular opacity in the {lobe}."),
    "mass": ("There is a {quality} mass in the {lobe}.", "A {quality} mass is seen in the {lobe}.",
             "{quality} mass in the {lobe}."),
    "consolidation": ("{quality} consolidation in the {lobe}.",
                      "There is {quality} airspace consolidation in the {lobe}.",
                      "{quality} opacity in the {lobe}, consistent with consolidation."),
    "no_effusion_no_ptx": ("No pleural effusion or pneumothorax.", "There is no pleural effusion or pneumothorax.",
                           "No pneumothorax or pleural effusion is seen."),
    "no_effusion": ("No pleural effusion.", "There is no pleural effusion."),
    "no_ptx": ("No pneumothorax.", "There is no pneumothorax."),
    "lungs_clear": ("The lungs are clear.", "The lungs are clear without focal consolidation.",
                    "Both lungs are clear."),
    "no_consolidation": ("No focal consolidation.", "There is no focal airspace consolidation."),
    "no_nodule": ("No suspicious pulmonary nodules or masses.",),
    "bones": ("No acute osseous abnormality.", "The visualized osseous structures are unremarkable."),
    "impression_normal": ("No acute cardiopulmonary process.",),
    # prompts
    "p_report_generation": ("Write a radiology report for this Chest X-ray.",
                            "Generate the findings section of the report for this chest radiograph.",
                            "Please write the findings of this chest X-ray.", "Describe the findings in this image.",
                            "Could you write a report for this radiograph?", "Provide a radiology report for this image."),
    "p_abnormality_grounding": ("Locate the abnormalities on this Chest X-ray.",
                                "Where are the lesions located on this image?",
                                "Detect all abnormalities in this chest radiograph and give their coordinates."),
    "p_phrase_grounding": ("Please locate the following phrase on the image: {phrase}",
                           "Where can the following finding be observed on this Chest X-ray? {phrase}",
                           "Provide the bounding box of this phrase: {phrase}"),
    "p_anatomical_grounding": ("Locate the {region} in this image.", "Where is the {region} on this Chest X-ray?",
                               "Provide the bounding box coordinates of the {region}."),
    "p_classification": ("Which abnormalities are present in this Chest X-ray?",
                         "List the findings present in this image.",
                         "What pathologies can be identified on this chest radiograph?"),
    # answers with boxes
    "a_abnormality": ("The {name} is located at the coordinates {boxes} on the image.",),
    "a_phrase": ("This phrase can be observed at {boxes} on the image.",),
    "a_region": ("The {region} is located at the coordinates {boxes} on the image.",),
    # conversation
    "q_yesno": ("Is there {qname} on this Chest X-ray?", "Does this radiograph show {qname}?",
                "Can you see {qname} in this image?"),
    "a_no": ("No, there is no {name} on this image.", "No {name} is seen."),
    "a_no_cardiomegaly": ("No, the heart size is normal.",),
    "q_where": ("Where is it located?", "Can you show me where it is?", "Where exactly is it on the image?"),
    "a_where": ("It is located at the coordinates {boxes} on the image.", "It can be observed at {boxes} on the image."),
    "q_other": ("Are there any other abnormalities?", "Is there anything else abnormal on this image?"),
    "a_other": ("Yes, the image also shows {list}.",),
    "a_no_other": ("No, there are no other abnormalities.", "No, the rest of the examination is normal."),
    # thinking traces
    "t_cardiomegaly": (("The cardiac silhouette is wide relative to the thoracic diameter, so the heart is "
                        "{degree}ly enlarged."),),
    "t_heart_normal": ("The cardiac silhouette has a normal width.",),
    "t_pleural effusion": (("The {side} costophrenic angle is blunted by a homogeneous basal opacity with a meniscus, "
                            "which fits a {size} pleural effusion."),),
    "t_pneumothorax": (("At the {side} apex there is a lucent area without lung markings beyond a thin pleural line, "
                        "which indicates a {size} pneumothorax."),),
    "t_nodule": ("A {quality} small round opacity lies in the {lobe}; this is a nodule.",),
    "t_mass": ("A {quality} round opacity larger than a nodule lies in the {lobe}; this is a mass.",),
    "t_consolidation": ("There is a {quality} area of airspace opacity in the {lobe}, consistent with consolidation.",),
    "t_no_effusion": ("The costophrenic angles are sharp.",),
    "t_no_ptx": ("Lung markings extend to the chest wall on both sides.",),
    "t_no_consolidation": ("There is no focal airspace opacity.",),
    "t_no_nodule": ("There is no rounded opacity in either lung.",),
    "t_review": ("I review the lungs, the pleura and the heart.",),
    "t_end_report_generation": ("I summarise these observations, with the relevant negatives, in a findings report.",),
    "t_end_abnormality_grounding": ("I give the coordinates of each abnormality.",),
    "t_end_grounding_normal": ("No abnormality needs to be localised.",),
    "t_phrase": ("I give the box around the region this phrase describes.",),
    "t_no_nodule_only": ("There is no small round opacity that would be a nodule.",),
    "t_no_mass": ("There is no opacity large enough to be a mass.",),
    "a_yes": ("Yes. {sentence}",),
    "l_cardiomegaly": ("cardiomegaly",), "l_pleural effusion": ("a {side} pleural effusion",),
    "l_nodule": ("a nodule in the {lobe}",), "l_mass": ("a mass in the {lobe}",),
    "l_consolidation": ("consolidation in the {lobe}",), "l_pneumothorax": ("a {side} pneumothorax",),
    "t_region": (("I locate the {region} from the surrounding anatomy: the lung fields, the cardiac silhouette "
                  "and the diaphragm."),),
    "t_end_classification": ("So the present labels are: {list}.",),
    "t_where": ("I outline the finding described above with a bounding box.",),
}
QNAME = {"cardiomegaly": "cardiomegaly", "pleural effusion": "a pleural effusion", "nodule": "a pulmonary nodule",
         "mass": "a mass", "consolidation": "any consolidation", "pneumothorax": "a pneumothorax"}
SLOT_VALUES: dict[str, tuple[str, ...]] = {
    "degree": ("mild", "moderate"), "size": SIZES, "side": SIDES, "lobe": tuple(LOBES.values()),
    "quality": tuple(sorted({q for qs in QUALITIES.values() for q in qs} | set(FAINT.values()))),
    "region": REGIONS, "name": FINDINGS, "qname": tuple(QNAME.values()),
    # composite slots: their words come from other families (phrases, lists) or from the number strings
    "boxes": ("[0.12, 0.3, 0.5, 0.71] and [0.0, 0.05, 1.0, 0.99]",), "phrase": ("",), "sentence": ("",),
    "list": ("",),
}
ABSENT_TRACE = {"cardiomegaly": "t_heart_normal", "pleural effusion": "t_no_effusion", "pneumothorax": "t_no_ptx",
                "consolidation": "t_no_consolidation", "nodule": "t_no_nodule_only", "mass": "t_no_mass"}


def _fill(template: str, family: str = "", **slots: str) -> str:
    """Fill the slots; capitalise the first letter except for list items (families "l_*")."""
    text = template.format(**slots)
    return text if family.startswith("l_") else text[:1].upper() + text[1:]


def _say(rng: np.random.Generator, family: str, **slots: str) -> str:
    """One template of the family, chosen by rng, filled by `_fill`."""
    options = FAMILIES[family]
    return _fill(options[int(rng.integers(len(options)))], family, **slots)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def format_box(box: tuple[float, ...] | list[float]) -> str:
    """`[0.12, 0.3, 0.5, 0.71]`: each value `repr(round(x, 2))`, as `metrics.boxes.format_box` writes it."""
    return "[" + ", ".join(repr(round(float(v), 2) + 0.0) for v in box) + "]"


def format_boxes(boxes: list) -> str:
    return _join([format_box(b) for b in boxes]) if boxes else ""


# --------------------------------------------------------------------------------------------- findings


@dataclass(frozen=True)
class Finding:
    kind: str  # one of FINDINGS
    side: str | None = None  # patient side
    zone: str | None = None  # upper | middle | lower
    size: str | None = None  # effusion / pneumothorax: small|moderate|large; cardiomegaly: mild|moderate
    quality: str | None = None  # nodule / mass / consolidation descriptor
    alpha: float = 1.0  # opacity strength in [0.35, 1]
    extent: float = 0.0  # heart width factor | effusion height | radius | pneumothorax depth
    u: float = 0.5  # position inside the zone, in [0, 1] (focal lesions)
    v: float = 0.5

    @property
    def lobe(self) -> str:
        return LOBES[(self.side, self.zone)]

    def slots(self) -> dict[str, str]:
        out = {"name": self.kind, "qname": QNAME[self.kind]}
        for key in ("side", "size", "quality"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.kind == "cardiomegaly":
            out["degree"] = self.size
        if self.zone is not None:
            out["lobe"] = self.lobe
        return out


# ------------------------------------------------------------------------------------------------ text


def report_text(rng: np.random.Generator, findings: list[Finding]) -> tuple[str, dict[str, str]]:
    """A findings report (lungs, pleura, heart, in one of two orders) and the sentence said for each finding."""
    said = {f.kind: _say(rng, f.kind, **f.slots()) for f in findings}
    lungs = [said[k] for k in ("consolidation", "nodule", "mass") if k in said]
    if not lungs:
        lungs = [_say(rng, "no_consolidation" if "pleural effusion" in said else "lungs_clear")]
    elif "consolidation" not in said:
        lungs.append(_say(rng, "no_consolidation"))
    elif "nodule" not in said and "mass" not in said and rng.uniform() < 0.3:
        lungs.append(_say(rng, "no_nodule"))
    pleura = [said[k] for k in ("pleural effusion", "pneumothorax") if k in said]
    negative = {(False, False): "no_effusion_no_ptx", (True, False): "no_ptx", (False, True): "no_effusion"}.get(
        ("pleural effusion" in said, "pneumothorax" in said))
    if negative:
        pleura.append(_say(rng, negative))
    heart = [said["cardiomegaly"] if "cardiomegaly" in said else _say(rng, "heart_normal")]
    parts = lungs + pleura + heart if rng.uniform() < 0.6 else heart + lungs + pleura
    if rng.uniform() < 0.3:
        parts.append(_say(rng, "bones"))
    if not findings and rng.uniform() < 0.3:
        parts.append(_say(rng, "impression_normal"))
    return " ".join(parts), said


def finding_observation(f: Finding) -> str:
    """The trace sentence describing what finding f looks like."""
    return _fill(FAMILIES[f"t_{f.kind}"][0], **f.slots())


def observations(findings: list[Finding]) -> list[str]:
    """Trace sentences: what is seen in the heart, lungs and pleura (present findings and negatives)."""
    by = {f.kind: f for f in findings}
    out = [finding_observation(by["cardiomegaly"]) if "cardiomegaly" in by else FAMILIES["t_heart_normal"][0]]
    out += [finding_observation(by[k]) for k in ("consolidation", "nodule", "mass") if k in by]
    if "nodule" not in by and "mass" not in by:
        out.append(FAMILIES["t_no_nodule"][0])
    if "consolidation" not in by:
        out.append(FAMILIES["t_no_consolidation"][0])
    for kind, neg in (("pleural effusion", "t_no_effusion"), ("pneumothorax", "t_no_ptx")):
        out.append(finding_observation(by[kind]) if kind in by else FAMILIES[neg][0])
    return out


def _trace(*parts: str | list[str]) -> str:
    return " ".join(p for part in parts for p in ([part] if isinstance(part, str) else part))


def case_records(image_id: str, image: str, findings: list[Finding], boxes: list[tuple], regions: dict[str, tuple],
                 rng: np.random.Generator) -> tuple[list[dict], list[dict]]:
    """RadVLM record dicts for one image: (plain records, thinking records), one per task (phrase grounding
    only with findings). Each exchange is (prompt, answer, trace); the trace is used by the thinking copy."""
    obs, review = observations(findings), FAMILIES["t_review"][0]
    report, said = report_text(rng, findings)
    by = {f.kind: (f, b) for f, b in zip(findings, boxes)}
    items: list[tuple[str, list[tuple[str, str, str]], dict]] = []
    items.append(("report_generation", [(_say(rng, "p_report_generation"), report,
                                         _trace(review, obs, FAMILIES["t_end_report_generation"][0]))], {}))
    if findings:
        answer = " ".join(_say(rng, "a_abnormality", name=f.kind, boxes=format_box(b)) for f, b in zip(findings, boxes))
        trace = _trace(review, obs, FAMILIES["t_end_abnormality_grounding"][0])
    else:
        answer, trace = NORMAL_GROUNDING, _trace(review, obs, FAMILIES["t_end_grounding_normal"][0])
    items.append(("abnormality_grounding", [(_say(rng, "p_abnormality_grounding"), answer, trace)],
                  {"boxes": [list(b) for b in boxes], "labels": [LABELS[f.kind] for f in findings]}))
    if findings:
        f = findings[int(rng.integers(len(findings)))]
        b = by[f.kind][1]
        items.append(("phrase_grounding", [(_say(rng, "p_phrase_grounding", phrase=said[f.kind]),
                                            _say(rng, "a_phrase", boxes=format_box(b)),
                                            _trace(finding_observation(f), FAMILIES["t_phrase"][0]))],
                      {"boxes": [list(b)]}))
    region = REGIONS[int(rng.integers(len(REGIONS)))]
    items.append(("region_grounding", [(_say(rng, "p_anatomical_grounding", region=region),
                                            _say(rng, "a_region", region=region, boxes=format_box(regions[region])),
                                            _fill(FAMILIES["t_region"][0], region=region))],
                  {"boxes": [list(regions[region])]}))
    labels = [LABELS[f.kind] for f in findings] or [NO_FINDING]
    items.append(("abnormality_classification", [(_say(rng, "p_classification"), ", ".join(labels),
                                      _trace(review, obs, _fill(FAMILIES["t_end_classification"][0],
                                                                list=", ".join(labels))))], {"labels": labels}))
    items.append(("conversation", *_conversation(rng, findings, by, obs)))
    plain = [_record(image_id, task, image, ex, False, keys) for task, ex, keys in items]
    think = [_record(image_id, task, image, ex, True, keys) for task, ex, keys in items]
    return plain, think


def _yes_no(rng: np.random.Generator, kind: str, by: dict) -> tuple[str, str, str]:
    question = _say(rng, "q_yesno", qname=QNAME[kind])
    if kind in by:
        f = by[kind][0]
        return question, _say(rng, "a_yes", sentence=_say(rng, kind, **f.slots())), finding_observation(f)
    answer = _say(rng, "a_no_cardiomegaly") if kind == "cardiomegaly" else _say(rng, "a_no", name=kind)
    return question, answer, FAMILIES[ABSENT_TRACE[kind]][0]


def _conversation(rng: np.random.Generator, findings: list[Finding], by: dict, obs: list[str]):
    """2-3 exchanges: yes/no about one finding kind, then its location (present) or the other findings
    (absent), then with probability 0.5 a yes/no about a second kind. → (exchanges, keys)."""
    present = [f.kind for f in findings]
    absent = [k for k in FINDINGS if k not in present]
    ask_present = bool(present) and (not absent or rng.uniform() < 0.7)
    pool = present if ask_present else absent
    target = pool[int(rng.integers(len(pool)))]
    exchanges = [_yes_no(rng, target, by)]
    keys: dict = {}
    if ask_present:
        box = by[target][1]
        exchanges.append((_say(rng, "q_where"), _say(rng, "a_where", boxes=format_box(box)), FAMILIES["t_where"][0]))
        keys["boxes"] = [list(box)]
    else:
        others = [_say(rng, f"l_{f.kind}", **f.slots()) for f in findings]
        answer = _say(rng, "a_other", list=_join(others)) if others else _say(rng, "a_no_other")
        exchanges.append((_say(rng, "q_other"), answer, _trace(obs)))
    if rng.uniform() < 0.5:
        rest = [k for k in FINDINGS if k != target]
        exchanges.append(_yes_no(rng, rest[int(rng.integers(len(rest)))], by))
    return exchanges, keys


def _record(image_id: str, task: str, image: str, exchanges: list[tuple[str, str, str]], thinking: bool,
            keys: dict) -> dict:
    conv = []
    for i, (prompt, answer, trace) in enumerate(exchanges):
        if thinking:
            prompt, answer = make_thinking_prompt(prompt), make_thinking_answer(trace, answer)
        conv.append({"from": "human", "value": (f"{IMAGE_TAG}\n" if i == 0 else "") + prompt})
        conv.append({"from": "gpt", "value": answer})
    return {"id": f"{image_id}-{task}" + ("-think" if thinking else ""), "image": image, "conversations": conv,
            "task": task, **keys}


def phantom_text_corpus() -> list[str]:
    """Every template expanded with every slot value, the label names and the box number strings: a superset
    of the words the dataset can produce (for training a tokenizer)."""
    out = []
    for family, templates in FAMILIES.items():
        for template in templates:
            names = sorted({name for _, name, _, _ in string.Formatter().parse(template) if name})
            for combo in itertools.product(*(SLOT_VALUES[name] for name in names)):
                out.append(_fill(template, family, **dict(zip(names, combo))))
    out += [", ".join(LABELS.values()), NO_FINDING, NORMAL_GROUNDING, make_thinking_prompt(""),
            make_thinking_answer("", ""), IMAGE_TAG]
    numbers = [repr(round(i / 100, 2)) for i in range(101)]
    out += [format_box([float(v) for v in numbers[i:i + 4]]) for i in range(0, 101, 4)] + [" ".join(numbers)]
    return out


def words(text: str) -> list[str]:
    """Word tokens used to compare texts with the corpus: letters/digits/hyphens/dots, or one punctuation."""
    return re.findall(r"[A-Za-z]+(?:-[A-Za-z]+)*|\d+(?:\.\d+)?|[^\sA-Za-z\d]", text)
