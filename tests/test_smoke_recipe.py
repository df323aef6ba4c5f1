"""The CPU smoke recipe of docs/smoke.md, run as written (SFT → GRPO → predict → evaluate) on records built the
way RadVLM's builders build them: no task key, the task only in the id prefix."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import yaml

import main
from radvlm_tools import evaluate
from radvlm_tools.prediction_files import read_prediction_file
from tests.datamodules.test_radvlm_records import radvlm_record
from tests.helpers import write_records

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "smoke.md"
TRAIN = ("mimic-train", "mimic-labels-train", "chestima-train", "vindr-cxr-mono-train1", "vindr-cxr-train1",
         "mscxr-train1", "padchest-train1", "conv-train", "conv-grounded-train1")
TEST = ("mimic-test", "vindr-cxr-mono-test1", "vindr-cxr-test1", "mscxr-test1", "chestima-test")


def recipe() -> list[str]:
    """The lines of the bash block of docs/smoke.md."""
    block = re.search(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    assert block, "docs/smoke.md has no bash block"
    return [ln for ln in block.group(1).splitlines() if ln.strip()]


def run_line(line: str, env: dict[str, str]) -> int:
    """One documented command, in this process: ``python main.py …`` through ``main.run`` (exit status),
    ``python -m radvlm.tiny`` / ``radvlm_tools.evaluate`` through their ``main``."""
    for name, value in env.items():
        line = line.replace(f"${name}", value)
    argv = shlex.split(line)
    assert argv[0] == "python", line
    if argv[1] == "main.py":
        return main.run(argv[2:])
    assert argv[1] == "-m", line
    if argv[2] == "radvlm.tiny":
        from radvlm.tiny import main as tiny_main

        tiny_main(argv[3:])
    elif argv[2] == "radvlm_tools.evaluate":
        evaluate.main(argv[3:])
    else:
        raise AssertionError(f"unexpected command in docs/smoke.md: {line}")
    return 0


def test_smoke_configs_hard_code_no_output_folder():
    for stage in ("sft", "grpo", "predict"):
        config = yaml.safe_load((ROOT / "configs" / "smoke" / f"{stage}.yaml").read_text())
        trainer = config["trainer"]
        assert trainer["logger"] in (True, False), stage  # Lightning's logger: save_dir = default_root_dir
        for cb in trainer["callbacks"]:
            args = cb.get("init_args") or {}
            assert "dirpath" not in args and "output" not in args and "save_dir" not in args, (stage, cb)
        assert "export_dir" not in config["model"]["init_args"], stage


def test_the_documented_smoke_recipe_runs_end_to_end_on_radvlm_records(tmp_path, capsys):
    data, out = tmp_path / "radvlm", tmp_path / "smoke"
    train = [radvlm_record(p, i, f"images/{p}/{i}.png") for p in TRAIN for i in range(2)]
    write_records(data, train, "train.json")
    write_records(data, [radvlm_record(p, 9, f"images/{p}/9.png") for p in TRAIN[:5]], "val.json")
    write_records(data, [radvlm_record(p, i, f"images/{p}/{i}.png") for p in TEST for i in range(2)], "test.json")
    assert not any("task" in r or "boxes" in r for r in json.loads((data / "train.json").read_text()))

    lines = recipe()
    assert lines[0].startswith("DATA=") and " OUT=" in lines[0]
    commands = lines[1:]
    assert [c.split()[1:3] for c in commands] == [["-m", "radvlm.tiny"], ["main.py", "fit"], ["main.py", "fit"],
                                                  ["main.py", "predict"], ["-m", "radvlm_tools.evaluate"]]
    env = {"DATA": str(data), "OUT": str(out)}
    for command in commands:
        assert run_line(command, env) == 0, command
        printed = capsys.readouterr().out
        if "configs/smoke/sft.yaml" in command:
            assert "[SFT] batch 1/4" in printed  # progress counts batches from 1
        if "configs/smoke/grpo.yaml" in command:
            assert "[GRPO] batch 1/2" in printed

    # every output below its stage's default_root_dir, the exports where the commands put them
    for stage in ("sft", "grpo"):
        assert list((out / stage / "lightning_logs").glob("version_*/checkpoints/last.ckpt")), stage
        assert list((out / stage / "lightning_logs").glob("version_*/events.out.tfevents.*")), stage
    assert (out / "sft_model" / "config.json").is_file() and (out / "grpo_model" / "config.json").is_file()
    read = read_prediction_file(out / "predict" / "predictions.jsonl")
    assert len(read.rows) == 2 * len(TEST) and read.header["name_or_path"] == str((out / "grpo_model").resolve())
    tasks = {r["task"] for r in read.rows}
    assert tasks == {"report_generation", "abnormality_grounding", "abnormality_detection", "phrase_grounding",
                     "region_grounding"}  # from the id prefixes alone
    # boxes only in the reference answers: the rows carry them
    mono = [r for r in read.rows if r["task"] == "abnormality_grounding"]
    assert mono and all(r["gt_boxes"] == [[0.61, 0.33, 0.7, 0.41]] and r["gt_boxes_from"] == "reference"
                        for r in mono)
    result = json.loads((out / "predict" / "predictions.eval.json").read_text())
    assert result["tasks"]["report_generation"]["metrics"]["rouge_l"]["value"] is not None
    grounding = result["tasks"]["abnormality_detection"]["metrics"]
    # vindr-cxr test records 0 and 1: one with two findings, one "no finding" (index % 2) → mAP ceiling 0.5
    assert grounding["map"]["ceiling"] == 0.5
