"""A text-only forward on one of several ranks runs the vision tower on a stand-in image (``Policy.idle_vision``):
the values are unchanged, every vision weight gets a (zero) gradient, and the tower runs before the decoder
layers in forward and after them in backward, where an image rank's tower runs. The 2-process FSDP2 fit with
text-only batches on one rank is in tests/lightning_modules/test_rank_agreement.py."""

from __future__ import annotations

import pytest
import torch

from datamodules.collate import SFTCollator
from datamodules.records import load_records
from radvlm.policy import Policy
from tests.helpers import report_record, write_records


@pytest.fixture(scope="module")
def text_batch(tiny_ckpt, tmp_path_factory):
    import dataclasses

    path = write_records(tmp_path_factory.mktemp("idle"), [report_record(0), report_record(1, "No effusion.")])
    records = [dataclasses.replace(r, image=None) for r in load_records(path)]
    batch = SFTCollator(Policy.from_pretrained(tiny_ckpt).processor)(records)
    assert batch.get("pixel_values") is None
    return batch


@pytest.fixture()
def several_ranks(monkeypatch):
    """``torch.distributed`` as one process of two sees it (no process group is started)."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)


def _policy(tiny_ckpt):
    return Policy.from_pretrained(tiny_ckpt, dtype="float32")


def _vision_params(policy):
    return {n: p for n, p in policy.hf_model.model.visual.named_parameters()}


def test_one_process_needs_no_stand_in(tiny_ckpt, text_batch):
    assert not _policy(tiny_ckpt).needs_idle_vision(text_batch)


def test_a_batch_with_images_needs_no_stand_in(tiny_ckpt, text_batch, several_ranks):
    policy = _policy(tiny_ckpt)
    assert policy.needs_idle_vision(text_batch)
    assert not policy.needs_idle_vision({**text_batch, "pixel_values": torch.zeros(4, 8)})
    assert not policy.needs_idle_vision({**text_batch, "distinct_pixel_values": torch.zeros(4, 8)})


def test_stand_in_is_zero_and_reaches_every_vision_weight(tiny_ckpt):
    policy = _policy(tiny_ckpt)
    zero = policy.idle_vision_zero()
    assert zero.shape == () and zero.dtype == torch.float32 and float(zero) == 0.0
    zero.backward()
    grads = {n: p.grad for n, p in _vision_params(policy).items()}
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, missing  # every weight of the tower, the deepstack mergers included
    assert all(float(g.abs().max()) == 0.0 for g in grads.values())


def test_text_only_loss_is_unchanged_and_gives_the_tower_zero_gradients(tiny_ckpt, text_batch, monkeypatch):
    policy = _policy(tiny_ckpt)
    alone_loss, n = policy.sft_loss(text_batch)
    alone_loss.backward()
    assert all(p.grad is None for p in _vision_params(policy).values())  # one process: the tower is not run
    alone_grads = {k: p.grad.clone() for k, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad(set_to_none=True)

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    loss, m = policy.sft_loss(text_batch)
    assert m == n and torch.equal(loss, alone_loss)
    loss.backward()
    vision = _vision_params(policy)
    assert all(p.grad is not None and float(p.grad.abs().max()) == 0.0 for p in vision.values())
    for k, p in policy.named_parameters():
        if k in alone_grads:
            assert torch.equal(p.grad, alone_grads[k]), k


def test_the_tower_runs_before_the_decoder_in_forward_and_after_it_in_backward(tiny_ckpt, text_batch,
                                                                                several_ranks):
    policy = _policy(tiny_ckpt)
    model = policy.hf_model.model
    events: list[str] = []
    first_block, first_layer = model.visual.blocks[0], model.language_model.layers[0]
    hooks = [first_block.register_forward_hook(lambda *a: events.append("vision forward")),
             first_layer.register_forward_hook(lambda *a: events.append("decoder forward")),
             first_block.register_full_backward_hook(lambda *a: events.append("vision backward")),
             first_layer.register_full_backward_hook(lambda *a: events.append("decoder backward"))]
    try:
        loss, _ = policy.sft_loss(text_batch)
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    assert events == ["vision forward", "decoder forward", "decoder backward", "vision backward"]
    # the embedding hook is removed after the forward: a later forward is hooked only if it needs the stand-in
    assert not policy.hf_model.get_input_embeddings()._forward_hooks
