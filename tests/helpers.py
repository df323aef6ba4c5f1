"""Small builders shared by tests (import as ``from tests.helpers import ...``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_records(folder: Path, records: list[dict], name: str = "data.json") -> Path:
    """Write RadVLM records (and a random 64×64 PNG for every ``image`` they name) under ``folder``."""
    rng = np.random.default_rng(0)
    for rec in records:
        if "image" in rec:
            path = folder / rec["image"]
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                Image.fromarray((rng.random((64, 64)) * 255).astype("uint8")).save(path)
    out = folder / name
    out.write_text(json.dumps(records))
    return out


def report_record(i: int, answer: str = "The heart is normal. No pleural effusion.") -> dict:
    return {
        "id": f"r{i}",
        "image": f"img/{i}.png",
        "task": "report_generation",
        "conversations": [
            {"from": "human", "value": "<image>\nWrite a radiology report for this Chest X-ray."},
            {"from": "gpt", "value": answer},
        ],
    }


class FakeChatServer:
    """A stand-in OpenAI-compatible ``/v1/chat/completions`` server on 127.0.0.1 (a thread; use ``with``).

    ``respond(payload) -> str | int``: the assistant text to return, or an HTTP error code to answer with.
    ``seen`` records ``(headers, payload)`` of every request; ``url`` is the base URL (``…/v1``)."""

    def __init__(self, respond):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.seen.append((dict(self.headers), payload))
                out = server.respond(payload)
                code, body = (out, {"error": f"scripted {out}"}) if isinstance(out, int) else (200, {
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": out},
                                 "finish_reason": "stop"}]})
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.respond, self.seen = respond, []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> FakeChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def eval_metrics_config(bert: str, chexbert: str, radgraph: str | None, radcliq_radgraph: str | None,
                        device: str = "cpu", **extra) -> dict:
    """A metrics-config layer for ``radvlm_tools.evaluate`` (over configs/eval_metrics/default.yaml) whose model-based
    metrics load the given weights: a local BERT folder (2 layers, not rescaled) for BERTScore and RadCliQ's
    BERTScore, a CheXbert checkpoint on that BERT, RadGraph folders for RadGraph-F1 and RadCliQ."""
    bertscore = {"class_path": "metrics.bertscore.BERTScore", "init_args": {"model_type": bert, "num_layers": 2}}
    return {
        "device": device,
        "bertscore": {"init_args": {"model_type": bert, "num_layers": 2, "rescale_with_baseline": False}},
        "chexbert": {"init_args": {"checkpoint": chexbert, "bert_name_or_path": bert}},
        "radgraph": {"init_args": {"model_dir": radgraph}},
        "radcliq": {"init_args": {
            "radgraph": {"class_path": "metrics.radgraph.RadGraphF1",
                         "init_args": {"model_type": "radgraph", "model_dir": radcliq_radgraph, "reward_level": "radcliq"}},
            "bertscore": bertscore,
            "semb": {"class_path": "metrics.chexbert.CheXbertSimilarity",
                     "init_args": {"checkpoint": chexbert, "bert_name_or_path": bert}}}},
        **extra,
    }
