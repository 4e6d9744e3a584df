"""The hand-made gradient all-reduce of the joint loop (:mod:`deltatune.train.distributed.grads`), on two
real gloo ranks (spawned processes) against sums written out here.

Rank ``r`` gives tensor ``a`` the gradient ``(r + 1) * base_a``; ``b`` has a gradient on rank 0 only (rank
1 had no rows for it); ``c`` has none on either rank (it must stay ``None`` so the optimizer skips it,
as one process would); ``d`` is float64 (a bucket of its own). ``a`` is passed twice and must be summed
once; a small bucket size forces several buckets.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn

from deltatune.train.distributed.grads import _buckets, all_reduce_gradients
from deltatune.train.distributed.runtime import Distributed

SHAPES = {"a": (3, 4), "b": (5,), "c": (2, 2), "d": (6,)}


def _base(name: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(len(name) * 31 + ord(name))
    return torch.randn(SHAPES[name], generator=gen, dtype=torch.float64 if name == "d" else torch.float32)


def _rank_params(rank: int) -> dict[str, nn.Parameter]:
    params = {name: nn.Parameter(torch.zeros_like(_base(name))) for name in SHAPES}
    params["a"].grad = (rank + 1) * _base("a")
    if rank == 0:
        params["b"].grad = _base("b")
    params["d"].grad = (rank + 1) * _base("d")
    return params


def _worker(rank: int, store: str, out: str) -> None:
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        params = _rank_params(rank)
        grad_a = params["a"].grad
        order = [params[n] for n in SHAPES] + [params["a"]]  # "a" twice
        all_reduce_gradients(Distributed(rank=rank, world_size=2), order, bucket_bytes=4 * 13)
        result = {n: None if p.grad is None else p.grad.tolist() for n, p in params.items()}
        result["a_in_place"] = params["a"].grad is grad_a
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        tdist.destroy_process_group()


def test_two_ranks_sum_each_gradient_once_and_keep_missing_ones_missing(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    want = {"a": 3 * _base("a"), "b": _base("b"), "d": 3 * _base("d")}  # (1 + 2) x base; rank 0's b + zeros
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["c"] is None and got["a_in_place"]
        for name, value in want.items():
            torch.testing.assert_close(torch.tensor(got[name], dtype=value.dtype), value, atol=1e-6, rtol=0)


def test_buckets_split_on_size_and_dtype() -> None:
    params = [nn.Parameter(torch.zeros(n)) for n in (12, 5, 8, 7, 4)] + [nn.Parameter(torch.zeros(6, dtype=torch.float64))]
    buckets = list(_buckets(params, bucket_bytes=4 * 13))  # room for 13 float32 values
    assert [[p.numel() for p in b] for b in buckets] == [[12], [5, 8], [7, 4], [6]]


def test_single_process_is_a_no_op() -> None:
    params = _rank_params(1)
    grads = {n: p.grad for n, p in params.items()}
    all_reduce_gradients(Distributed(), params.values())
    assert {n: p.grad for n, p in params.items()} == grads
