"""On several data-parallel ranks the training loader samples with a ``DistributedSampler`` seeded by
``seed_everything``'s seed and the epoch (``RadVLMDataModule._distributed_sampler``): the ranks split one
permutation, and a resumed loader's fast-forward lands on the uninterrupted run's batches. The 2- and 4-process
FSDP2 resumes are in tests/lightning_modules/test_rank_agreement.py (``hybrid_resume``). Validation and test
shards are padded with marked copies (``EvalShardSampler``) that carry no label (``eval_padding`` there)."""

from __future__ import annotations

from types import SimpleNamespace

from torch.utils.data import DistributedSampler

from datamodules.datamodule import RadVLMDataModule


def _data(tiny_ckpt, phantom_dir, world: int, rank: int) -> RadVLMDataModule:
    split = str(phantom_dir / "test.json")
    data = RadVLMDataModule(str(tiny_ckpt), train_files=[split], tasks=["report_generation"], batch_size=2,
                            check_images=False)
    data.setup()
    strategy = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": world, "rank": rank})
    data.trainer = SimpleNamespace(world_size=world, strategy=strategy)
    return data


def _ids(loader, n: int | None = None) -> list[list[str]]:
    out = []
    for batch in loader:
        out.append(list(batch["ids"]))
        if n is not None and len(out) == n:
            break
    return out


def test_one_process_keeps_the_stateful_random_sampler(tiny_ckpt, phantom_dir):
    data = _data(tiny_ckpt, phantom_dir, world=1, rank=0)
    assert not isinstance(data.train_dataloader().sampler, DistributedSampler)


def test_ranks_split_one_seeded_permutation_and_a_resumed_loader_continues_it(tiny_ckpt, phantom_dir, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    loaders = [_data(tiny_ckpt, phantom_dir, world=2, rank=r).train_dataloader() for r in (0, 1)]
    for loader in loaders:
        assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.seed == 3
    seen = [sorted(i for batch in _ids(loader) for i in batch) for loader in loaders]
    n = len(loaders[0].dataset)
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) + len(seen[1]) == n  # disjoint, every record once
    # stop after one batch, as a checkpoint does; a fresh loader restored from its state continues the same order
    whole = _ids(_data(tiny_ckpt, phantom_dir, world=2, rank=1).train_dataloader())
    first = _data(tiny_ckpt, phantom_dir, world=2, rank=1).train_dataloader()
    assert _ids(first, 1) == whole[:1]
    state = first.state_dict()
    resumed = _data(tiny_ckpt, phantom_dir, world=2, rank=1).train_dataloader()
    resumed.load_state_dict(state)
    assert _ids(resumed) == whole[1:]
    # another epoch is another permutation, the same on every rank (Lightning calls set_epoch)
    loader = _data(tiny_ckpt, phantom_dir, world=2, rank=1).train_dataloader()
    loader.sampler.set_epoch(1)
    assert _ids(loader) != whole


def test_evaluation_shards_pad_with_marked_copies_and_the_copies_carry_no_label(tiny_ckpt, phantom_dir):
    from datamodules.datamodule import EvalShardSampler, RecordDataset

    data = _data(tiny_ckpt, phantom_dir, world=2, rank=1)
    records = data.splits["train"][:3]
    dataset = RecordDataset(records)
    # 3 records on 2 ranks: positions 0..3, the 4th (3) a copy of record 0; on 5 ranks 0..4, copies of 0 and 1
    assert [list(EvalShardSampler(dataset, 2, r)) for r in (0, 1)] == [[0, 2], [1, 3]]
    assert [list(EvalShardSampler(dataset, 5, r)) for r in range(5)] == [[0], [1], [2], [3], [4]]
    assert [dataset[i].padding for i in range(5)] == [False] * 3 + [True] * 2
    assert [dataset[i].id for i in (3, 4)] == [records[0].id, records[1].id]
    batch = data.collator.for_evaluation()([dataset[2], dataset[3]])
    assert batch["padding"] == [False, True]
    assert bool((batch["labels"][1] == -100).all()) and bool((batch["labels"][0] != -100).any())
    assert batch["prompt"]["padding"] == [False, True]  # the prompts of validation generation carry it too
