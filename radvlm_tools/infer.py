"""Ask one question about one chest X-ray: ``python -m radvlm_tools.infer IMAGE "QUESTION" --model DIR``.

A tool built on the core: the image goes through the same checks, processor and chat template as training
and evaluation (``datamodules.collate.PromptCollator``), the answer comes from ``Policy.generate`` (greedy
unless ``--sample``), and for thinking prompts the answer after ``</think>`` is printed (``--show-thinking``
prints the trace too). ``--json`` prints one JSON object instead (question, completion, answer, boxes found).

    python -m radvlm_tools.infer cxr.png "Write a radiology report for this Chest X-ray." --model runs/sft/hf_export
    python -m radvlm_tools.infer cxr.png "Where is the Cardiomegaly located on this Chest X-ray?" --model DIR --json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from datamodules.collate import PromptCollator
from datamodules.records import Record, Turn
from metrics.boxes import parse_boxes
from radvlm.chat import split_thinking
from radvlm.policy import Policy


def answer_question(policy: Policy, image: str | Path, question: str, max_new_tokens: int = 256,
                    thinking_mode: str = "auto", sample: bool = False, temperature: float = 1.0) -> dict[str, Any]:
    """One image and question → ``{"question", "completion", "answer", "thinking", "boxes", "tokens"}``."""
    record = Record(id="infer", image=Path(image).resolve(), conversations=[Turn("user", question)])
    batch = PromptCollator(policy.processor, max_length=None, overlong="error", thinking_mode=thinking_mode)([record])
    device = next(policy.model.parameters()).device
    batch = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}
    out = policy.generate(batch, max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature)
    text = out.texts[0]
    thinking = bool(batch["thinking"][0])
    trace, answer, closed = split_thinking(text) if thinking else ("", text.strip(), True)
    return {"question": question, "completion": text, "answer": answer, "thinking": thinking,
            "think_closed": closed, "trace": trace, "boxes": parse_boxes(answer),
            "tokens": int(out.completion_mask[0].sum()), "truncated": bool(out.truncated[0])}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Answer one question about one chest X-ray with a radvlm model.")
    parser.add_argument("image", help="PNG/JPEG radiograph")
    parser.add_argument("question", help='e.g. "Write a radiology report for this Chest X-ray."')
    parser.add_argument("--model", required=True, help="checkpoint folder or hub id (an export of main.py fit)")
    parser.add_argument("--dtype", default="float32", help="float32 (CPU) or bfloat16 (GPU)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 …")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--thinking", choices=["auto", "on", "off"], default="auto",
                        help="auto: thinking when the question ends with ' /think'")
    parser.add_argument("--sample", action="store_true", help="sample (temperature) instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--show-thinking", action="store_true", help="print the thinking trace as well")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    policy = Policy.from_pretrained(args.model, dtype=args.dtype)
    policy.model.to(args.device).eval()
    result = answer_question(policy, args.image, args.question, args.max_new_tokens, args.thinking, args.sample,
                             args.temperature)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        if args.show_thinking and result["thinking"]:
            print(f"<think>\n{result['trace']}\n</think>\n")
        print(result["answer"])
    return result


if __name__ == "__main__":
    main()
