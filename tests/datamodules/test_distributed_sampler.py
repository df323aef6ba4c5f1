"""On several data-parallel ranks the training loader samples with a ``DistributedSampler`` seeded by
``seed_everything``'s seed and the epoch (``RadVLMDataModule._distributed_sampler``): the ranks split one
permutation, and a resumed loader's fast-forward lands on the uninterrupted run's batches. The 2- and 4-process
FSDP2 resumes are in tests/lightning_modules/test_rank_agreement.py (``hybrid_resume``)."""

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
