"""The task table: RadVLM's task names, what each task is scored with, and the task of a record from its id.

One place for task knowledge: which tasks answer with boxes (grounding, detection), which are reports,
classification or conversation. Modules ask ``is_box_task(task)`` / ``task_kind(task)`` instead of testing
name suffixes.

Canonical names are RadVLM's evaluation names (``report_generation``, ``abnormality_classification``,
``abnormality_grounding``, ``abnormality_detection``, ``region_grounding``, ``phrase_grounding``) plus
``conversation`` and ``grounded_conversation`` for its dialogue records. Earlier spellings of this project
are accepted as aliases everywhere a task name is read (``anatomical_grounding`` → ``region_grounding``,
``classification`` → ``abnormality_classification``); :func:`canonical_task` maps them.

RadVLM writes no ``task`` key: its dataset builder names every record ``f"{prefix}_{index}"`` and the
prefix carries the task (docs/data.md has the table). A prefix is ``SOURCE-SPLIT[N]`` with SPLIT one of
``train``/``val``/``valid``/``test`` and an optional split number (``vindr-cxr-mono-train1``,
``conv-grounded-padchest-test4``); :func:`task_from_id` reads it. Unknown prefixes give ``None`` (the data
module counts and reports them; it never drops them silently).
"""

from __future__ import annotations

import re
from typing import Literal

TaskKind = Literal["report", "grounding", "classification", "conversation"]

#: canonical task → kind of answer (decides metrics and rewards)
TASK_KINDS: dict[str, TaskKind] = {
    "report_generation": "report",
    "abnormality_classification": "classification",
    "abnormality_grounding": "grounding",  # one label → its boxes
    "abnormality_detection": "grounding",  # all findings with boxes, or RadVLM's "no finding" sentence
    "region_grounding": "grounding",  # anatomical region (Chest ImaGenome) → its box
    "phrase_grounding": "grounding",  # a report phrase → its boxes (MS-CXR, PadChest-GR)
    "conversation": "conversation",
    "grounded_conversation": "conversation",  # multi-turn, some answers hold boxes
}
TASKS: tuple[str, ...] = tuple(TASK_KINDS)
#: tasks whose answers are boxes, scored with soft-F1 / mAP@0.5
BOX_TASKS: tuple[str, ...] = tuple(t for t, k in TASK_KINDS.items() if k == "grounding")
#: RadVLM's evaluation task names (its evaluation knows no conversation task)
RADVLM_EVAL_TASKS: tuple[str, ...] = ("report_generation", "abnormality_classification", "abnormality_grounding",
                                      "abnormality_detection", "region_grounding", "phrase_grounding")

#: other spellings accepted wherever a task name is read
TASK_ALIASES: dict[str, str] = {
    "anatomical_grounding": "region_grounding",
    "classification": "abnormality_classification",
    "grounding": "abnormality_grounding",
    "detection": "abnormality_detection",
}

#: RadVLM id source (the prefix before ``-train``/``-test``…) → task, from its dataset builder
ID_SOURCES: dict[str, str] = {
    "mimic": "report_generation",  # MIMIC-CXR reports
    "chexpertplus": "report_generation",  # CheXpert-Plus reports
    "mimic-labels": "abnormality_classification",  # MIMIC-CXR labels
    "chexpert": "abnormality_classification",  # CheXpert labels
    "chestima": "region_grounding",  # Chest ImaGenome anatomy
    "vindr-cxr-mono": "abnormality_grounding",  # VinDr-CXR, one label per question
    "vindr-cxr": "abnormality_detection",  # VinDr-CXR, all findings (or "no finding")
    "mscxr": "phrase_grounding",  # MS-CXR
    "padchest": "phrase_grounding",  # PadChest-GR
    "conv": "conversation",  # MIMIC-CXR dialogues
    "conv-grounded": "grounded_conversation",  # MS-CXR dialogues
    "conv-grounded-padchest": "grounded_conversation",  # PadChest-GR dialogues
}

_ID_PATTERN = re.compile(r"^(?P<source>.+?)-(?P<split>train|val|valid|validation|test)(?P<part>\d*)_\d+$")


def canonical_task(name: str | None) -> str | None:
    """The canonical name of a task or of one of its aliases; ``None`` stays ``None``.

    Raises ``ValueError`` naming the known tasks for anything else.
    """
    if name is None:
        return None
    if name in TASK_KINDS:
        return name
    if name in TASK_ALIASES:
        return TASK_ALIASES[name]
    raise ValueError(f"unknown task {name!r}; expected one of {TASKS} (or an alias: {sorted(TASK_ALIASES)})")


def canonical_tasks(names: list[str] | None) -> list[str] | None:
    """:func:`canonical_task` of every name of a list (``None`` stays ``None``)."""
    return None if names is None else [canonical_task(n) for n in names]


def task_from_id(record_id: str) -> str | None:
    """The task RadVLM's id prefix names, e.g. ``"vindr-cxr-mono-train1_17"`` → ``"abnormality_grounding"``.

    ``None`` when the id does not have the ``SOURCE-SPLIT[N]_INDEX`` form or the source is unknown.
    """
    match = _ID_PATTERN.match(str(record_id))
    if match is None:
        return None
    return ID_SOURCES.get(match["source"])


def task_kind(task: str | None) -> TaskKind | None:
    """``"report"``, ``"grounding"``, ``"classification"``, ``"conversation"`` (aliases accepted), or
    ``None`` for an untasked record or a task this table does not know."""
    if task is None:
        return None
    task = TASK_ALIASES.get(task, task)
    return TASK_KINDS.get(task)


def task_think_split(task: str | None) -> str:
    """Where evaluation and prediction cut the answer of a thinking completion of ``task``: where the rewards
    of its answers cut it (the authors' choice, also the ``think_split`` attribute of the metric classes):
    box tasks after the ``"first"`` ``</think>``, every other task after the ``"last"``."""
    return "first" if is_box_task(task) else "last"


def is_box_task(task: str | None) -> bool:
    """Answers are boxes (every grounding task and abnormality detection)."""
    return task_kind(task) == "grounding"
