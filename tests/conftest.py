"""Shared fixtures: a tiny Qwen3-VL checkpoint and a small phantom dataset, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Tiny models: one intra-op thread is faster than two (thread hand-off costs more than the matmuls) and is
# immune to oversubscription when the machine is busy. Applies to every test.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from radvlm.tiny import write_tiny_checkpoint

    try:
        from datamodules.phantom import phantom_text_corpus

        corpus = phantom_text_corpus()
    except ImportError:
        corpus = None
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), corpus=corpus, seed=0)


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    from datamodules.phantom import write_phantom

    out = tmp_path_factory.mktemp("phantom")
    write_phantom(out, n=40, seed=0, size=128)
    return out


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny random BERT + WordPiece tokenizer folder (the format CheXbert, RadGraph and BERTScore load)."""
    from metrics.tiny import write_tiny_bert

    return write_tiny_bert(tmp_path_factory.mktemp("bert") / "bert")
