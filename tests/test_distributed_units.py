"""Single-process checks of the distributed helpers: sharding, launch environment, errors, save guard."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from deltatune.errors import CheckpointError, ConfigError, DistributedError
from deltatune.train.distributed.fsdp import verify_saved
from deltatune.train.distributed.runtime import Distributed, is_comm_failure, launch_env
from deltatune.train.distributed.sampler import ShardedSampler, epoch_permutation, shard_rows


def _reference_order(n: int, seed: int, epoch: int) -> list[int]:
    # written independently of the module: torch.randperm with the documented seed formula
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def test_shards_are_disjoint_cover_the_epoch_and_match_the_documented_order() -> None:
    n, world = 23, 3
    shards = [list(ShardedSampler(n, r, world, seed=7, drop_last=True)) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)) == n - n % world  # disjoint; only the ragged tail is dropped
    order = _reference_order(n, 7, 0)
    assert shards[1] == order[1 : n - n % world : world]  # rank r reads positions r, r + W, ...


def test_padding_gives_every_rank_the_same_length_like_distributedsampler() -> None:
    n, world = 10, 4
    shards = [list(ShardedSampler(n, r, world, seed=1)) for r in range(world)]
    assert [len(s) for s in shards] == [3, 3, 3, 3]
    assert sorted({i for s in shards for i in s}) == list(range(n))  # every row read at least once
    order = _reference_order(n, 1, 0)
    assert [s[-1] for s in shards] == [order[8], order[9], order[0], order[1]]  # the tail wraps to the start


def test_reshuffles_per_epoch_and_resumes_from_a_sample_position() -> None:
    sampler = ShardedSampler(40, 1, 2, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert first == _reference_order(40, 3, 0)[1::2] and first != second  # a new order each epoch
    assert second == _reference_order(40, 3, 1)[1::2]
    sampler.load_state_dict({"epoch": 1, "start": 10})  # 10 rows (5 per rank) already consumed
    assert list(sampler) == second[5:]
    assert len(sampler) == 15


def test_shard_rows_of_a_global_batch_shorter_than_the_world() -> None:
    assert shard_rows([5, 6, 7], 0, 2) == [5, 7] and shard_rows([5, 6, 7], 1, 2) == [6]
    assert shard_rows([5], 1, 2) == []  # the loop then runs a zero-weighted pass on a borrowed row
    assert epoch_permutation(6, 0, 0) == _reference_order(6, 0, 0)


@pytest.mark.parametrize("bad", [
    {"n": 0, "rank": 0, "world_size": 1}, {"n": 5, "rank": 2, "world_size": 2}, {"n": 5, "rank": 0, "world_size": 1, "start": 6},
])
def test_sampler_rejects_bad_arguments(bad: dict) -> None:
    with pytest.raises(ConfigError):
        ShardedSampler(**bad)


def test_launch_environment() -> None:
    assert launch_env({}) is None
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert launch_env(env) == {"rank": 1, "world_size": 2, "local_rank": 1}
    with pytest.raises(ConfigError, match="torchrun"):
        launch_env({"RANK": "0", "WORLD_SIZE": "2"})  # no rendezvous address
    with pytest.raises(ConfigError, match="Inconsistent"):
        launch_env({**env, "RANK": "2"})
    with pytest.raises(ConfigError, match="integers"):
        launch_env({**env, "RANK": "x"})
    single = Distributed.from_env(env={"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    assert not single.enabled and single.is_main and single.mode == "single"


def test_single_process_object_is_a_no_op() -> None:
    dist = Distributed()
    model = torch.nn.Linear(2, 2)
    assert dist.wrap(model) is model
    assert dist.shard([3, 1, 2]) == [3, 1, 2]
    assert dist.sum(1.5, 2) == [1.5, 2.0]
    assert dist.gather_objects({"a": 1}) == [{"a": 1}]
    assert dist.loss_scale() == 1.0
    with dist.grad_sync(model, sync=False):
        pass


def test_effective_batch_and_lr_report() -> None:
    info = Distributed(rank=0, world_size=4).describe(batch_size=8, grad_accum=2, lr=1e-3)
    assert info["effective_batch_size"] == 8 * 4 * 2
    assert "8 per rank x 4 ranks x 2 accumulation" in info["text"] and "0.001" in info["text"]


def test_communication_failures_become_clear_errors() -> None:
    dist = Distributed(rank=1, world_size=2, timeout_s=5)
    gloo = RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:3245")
    assert is_comm_failure(gloo) and not is_comm_failure(ValueError("shape mismatch"))
    with pytest.raises(DistributedError, match=r"Rank 1 of 2: a step failed .*--resume"), dist.guard("a step"):
        raise gloo
    with pytest.raises(KeyError), dist.guard("a step"):  # a genuine bug is not disguised as a communication failure
        raise KeyError("x")


def test_save_guard_catches_empty_partial_and_wrong_adapters(tmp_path: Path) -> None:
    full = {"a.lora_A.weight": torch.randn(4, 6), "a.lora_B.weight": torch.randn(6, 4)}
    shapes = {k: tuple(v.shape) for k, v in full.items()}
    file = tmp_path / "adapter_model.safetensors"
    save_file(full, str(file))
    verify_saved(file, full, shapes)  # the good case passes
    pruned = {**full, "b.lora_E": torch.empty(0, 1)}  # an AdaLoRA layer pruned to rank 0 is empty, rightly
    save_file(pruned, str(file))
    verify_saved(file, pruned, {k: tuple(v.shape) for k, v in pruned.items()})
    save_file(full, str(file))
    cases = {
        "empty shard": {**full, "a.lora_A.weight": torch.empty(0, 6)},
        "half shard": {**full, "a.lora_A.weight": full["a.lora_A.weight"][:2].clone()},
        "other values": {**full, "a.lora_B.weight": full["a.lora_B.weight"] + 1},
        "missing key": {"a.lora_A.weight": full["a.lora_A.weight"]},
    }
    for written in cases.values():
        save_file(written, str(file))
        with pytest.raises(CheckpointError, match="incomplete"):
            verify_saved(file, full, shapes)


def test_ddp_synchronises_only_the_delta_and_still_answers_the_models_attributes(tmp_path: Path, make_model) -> None:
    import torch.distributed as dist

    import deltatune as dt
    from deltatune.train.distributed.runtime import _ddp_class

    model = dt.get_delta_model(make_model("bert_seq_cls"), dt.LoraConfig(r=4, target_modules=["query", "value"],
                                                                        task_type="SEQ_CLS"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trainable and sum(p.numel() for p in frozen) > 10 * sum(p.numel() for p in trainable)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = _ddp_class()(model, init_sync=False)
        info = wrapped._get_ddp_logging_data()
        # DDP's gradient buckets hold the adapter's tensors and nothing of the frozen base.
        assert info["num_parameter_tensors"] == len(trainable)
        assert info["total_parameter_size_bytes"] == sum(p.numel() * p.element_size() for p in trainable)
        assert wrapped.base_model is model.base_model and wrapped.peft_config is model.peft_config
    finally:
        dist.destroy_process_group()
