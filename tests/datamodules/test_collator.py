"""The data module's collator is injected (``collator``: a ``datamodules.collate.CollatorFactory``) and called at
setup with the processor and the data module's ``max_length``, ``overlong`` and ``thinking_mode``; evaluation and
prediction loaders use the collators it derives."""

from __future__ import annotations

import functools

import pytest
import torch

from datamodules.collate import Collator, PromptCollator, SFTCollator
from datamodules.datamodule import RadVLMDataModule
from lightning_modules.common import plain_value


class TaggedPrompts(PromptCollator):
    """A collator with an option of its own (what ``init_args`` of a config carry)."""

    def __init__(self, processor, max_length=None, overlong="drop", thinking_mode="auto", tag: str = "") -> None:
        super().__init__(processor, max_length, overlong, thinking_mode)
        self.tag = tag

    def extend(self, batch: dict, records: list) -> None:
        super().extend(batch, records)
        batch["tag"] = self.tag


def data_module(tiny_ckpt, phantom_dir, **kw) -> RadVLMDataModule:
    split = str(phantom_dir / "test.json")
    data = RadVLMDataModule(str(tiny_ckpt), train_files=[split], val_files=[split], predict_files=[split],
                            tasks=["report_generation"], batch_size=2, max_val_samples=2, check_images=False, **kw)
    data.setup()
    return data


def first(loader) -> dict:
    return next(iter(loader))


def test_the_default_collator_is_sft_with_prompts_at_validation_and_prompt_batches_for_prediction(tiny_ckpt,
                                                                                                  phantom_dir):
    data = data_module(tiny_ckpt, phantom_dir)
    assert type(data.collator) is SFTCollator
    train, val, predict = first(data.train_dataloader()), first(data.val_dataloader()), first(data.predict_dataloader())
    assert isinstance(train["labels"], torch.Tensor) and "prompt" not in train
    assert isinstance(val["labels"], torch.Tensor) and val["prompt"]["targets"]
    assert "targets" in predict and not isinstance(predict["labels"], torch.Tensor)  # a prompt batch


def test_an_injected_collator_gets_the_data_settings_and_its_own_options(tiny_ckpt, phantom_dir):
    data = data_module(tiny_ckpt, phantom_dir, collator=functools.partial(TaggedPrompts, tag="mine"), max_length=900,
                       overlong="error", thinking_mode="on")
    collator = data.collator
    assert isinstance(collator, TaggedPrompts) and collator.tag == "mine"
    assert (collator.max_length, collator.overlong, collator.thinking_mode) == (900, "error", "on")
    assert collator.processor is data.processor
    for loader in (data.train_dataloader(), data.val_dataloader(), data.predict_dataloader()):
        batch = first(loader)
        assert batch["tag"] == "mine" and batch["thinking"] == [True, True]


@pytest.mark.parametrize("collator", [PromptCollator, functools.partial(TaggedPrompts, tag="x")], ids=["class", "partial"])
def test_hyper_parameters_holding_a_collator_load_with_weights_only(tiny_ckpt, tmp_path, collator):
    """Built without ``main.py`` the hyper-parameters hold the collator itself; checkpoints keep a plain value of it
    (``PolicyModule.on_save_checkpoint`` writes ``plain_value`` of ``datamodule_hyper_parameters``)."""
    data = RadVLMDataModule(str(tiny_ckpt), collator=collator)
    path = tmp_path / "hparams.pt"
    torch.save({"datamodule_hyper_parameters": plain_value(dict(data.hparams))}, path)
    loaded = torch.load(path, weights_only=True)["datamodule_hyper_parameters"]
    name = "PromptCollator" if collator is PromptCollator else "TaggedPrompts"
    assert isinstance(loaded["collator"], str) and name in loaded["collator"]


def test_a_collator_factory_that_makes_no_collator_is_refused_at_setup(tiny_ckpt, phantom_dir):
    with pytest.raises(TypeError, match="collator must make a datamodules.collate.Collator"):
        data_module(tiny_ckpt, phantom_dir, collator=lambda processor, max_length, overlong, thinking_mode: None)
    assert issubclass(SFTCollator, Collator) and issubclass(PromptCollator, Collator)
