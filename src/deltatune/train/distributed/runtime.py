"""Data-parallel (DDP) and fully-sharded (FSDP) training on ``torch.distributed``, launched by ``torchrun``.

``torchrun --nproc_per_node=W -m deltatune train ...`` starts ``W`` processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set (so does ``accelerate launch``).
:meth:`Distributed.from_env` reads them and joins the process group (gloo on CPUs, NCCL on GPUs);
without them it returns a single-process object whose every method is a no-op, so the training
loop has one code path.

One optimizer step with ``W`` ranks, ``B`` rows per rank and ``A`` accumulation steps reads
``B * W * A`` rows (the effective batch). Rank ``r`` computes ``sum_i loss_i`` over its rows; with
``N`` the number of loss terms summed over all ranks (one all-reduce), each rank back-propagates
``W * loss_r / N``, and DDP's gradient average ``(1/W) sum_r`` then gives exactly the gradient of
``sum_all loss / N``: the same as one process reading all ``B * W * A`` rows.

* DDP (Li et al., arXiv 2006.15704) registers only parameters with ``requires_grad`` for its gradient
  all-reduce, so only the delta is synchronised; the frozen base is never communicated (we also skip
  DDP's start-up broadcast of the whole model and broadcast the trainable tensors only).
* FSDP (see :mod:`.distributed_fsdp`) shards the frozen base as well.

A rank that dies or hangs must not leave the others waiting forever: every collective has a timeout
(``timeout_s``), NCCL's asynchronous error handling is on, and communication failures become a
:class:`~deltatune.errors.DistributedError` that names the rank and what to do.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from ...errors import ConfigError, DistributedError
from . import fsdp as fsdp_lib
from .sampler import shard_rows

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 600.0
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Substrings of torch/gloo/NCCL errors that mean "another rank is gone", not "this rank has a bug".
_COMM_FAILURES = ("connection closed", "connection reset", "timed out", "timeout", "broken pipe", "nccl",
                  "gloo", "processgroup", "socket", "connection refused", "peer")


def launch_env(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """``{rank, world_size, local_rank}`` from a torchrun-style environment; ``None`` when not launched so."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env and "RANK" not in env:
        return None
    try:
        values = {k: int(env.get(k, "0")) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    except ValueError:
        shown = {k: env.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        raise ConfigError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got {shown}; launch with torchrun.") from None
    rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"Inconsistent launch environment RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}.")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if world > 1 and not env.get(k)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {missing} are not set; start the job with torchrun (or "
                          "accelerate launch), which sets them.")
    return {"rank": rank, "world_size": world, "local_rank": local}


def is_comm_failure(exc: BaseException) -> bool:
    """Whether ``exc`` reports a failed collective (a dead, hung or unreachable peer)."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc).lower() for s in _COMM_FAILURES)


class Distributed:
    """This process's place in the job; a single process (``world_size == 1``) makes every method a no-op.

    Args:
        rank / world_size / local_rank: from torchrun's environment.
        device: the device this rank computes on (``cuda:<local_rank>`` on GPUs, else the CPU).
        fsdp: shard the base model (FSDP2) instead of replicating it (DDP).
        bf16: compute in bfloat16 (autocast for DDP / one process, FSDP's mixed-precision policy).
        timeout_s: how long a collective waits for the other ranks before failing.
    """

    def __init__(
        self, rank: int = 0, world_size: int = 1, local_rank: int = 0, device: torch.device | None = None,
        fsdp: bool = False, bf16: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = device or torch.device("cpu")
        self.fsdp, self.bf16, self.timeout_s = fsdp and world_size > 1, bf16, timeout_s
        self.wrapped: nn.Module | None = None

    @classmethod
    def from_env(cls, fsdp: bool = False, bf16: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S,
                 env: Mapping[str, str] | None = None, device: str = "auto") -> Distributed:
        """Join the job torchrun started (gloo on CPUs, NCCL on GPUs), or a single process when there is none.

        ``device`` is the ``--device`` option: ``auto`` uses GPU ``LOCAL_RANK`` when CUDA is there, else the
        CPU; ``cpu`` forces the CPU (gloo); ``cuda``/``cuda:N`` mean "this rank's GPU" under torchrun.
        """
        found = launch_env(env)
        check_bf16(bf16)
        if found is None or found["world_size"] == 1:
            return cls(fsdp=False, bf16=bf16, timeout_s=timeout_s)
        import torch.distributed as dist

        if not dist.is_available():
            raise ConfigError("This torch build has no torch.distributed; install a build with it to use torchrun.")
        if device not in ("auto", "cpu") and not device.startswith("cuda"):
            raise ConfigError(f"--device {device} cannot run under torchrun; use cpu, cuda or auto.")
        cuda = device != "cpu" and torch.cuda.is_available()
        if device.startswith("cuda") and not cuda:
            raise ConfigError(f"--device {device}, but torch sees no CUDA GPU on this node; use --device cpu.")
        device = torch.device("cuda", found["local_rank"]) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a timed-out NCCL call aborts the process
        if not dist.is_initialized():
            timeout = datetime.timedelta(seconds=timeout_s)
            try:
                dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout,
                                        device_id=device if cuda else None)
            except Exception as exc:
                raise DistributedError(
                    f"Rank {found['rank']} could not join the process group within {timeout_s:g} s ({exc}). Check "
                    "that every node runs the same torchrun command with the same --rdzv-endpoint/--master-addr "
                    "and that the port is reachable."
                ) from exc
        return cls(found["rank"], found["world_size"], found["local_rank"], device, fsdp, bf16, timeout_s)

    # -- who am I ---------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes files, logs and progress."""
        return self.rank == 0

    @property
    def mode(self) -> str:
        return "fsdp" if self.fsdp else "ddp" if self.enabled else "single"

    def describe(self, batch_size: int, grad_accum: int, lr: float) -> dict[str, Any]:
        """Effective batch ``batch_size x ranks x grad_accum`` and the learning rate, for logs and summary."""
        effective = batch_size * self.world_size * grad_accum
        text = (f"{self.mode}: effective batch {effective} = {batch_size} per rank x {self.world_size} "
                f"rank{'s' if self.world_size > 1 else ''} x {grad_accum} accumulation; learning rate {lr:g} "
                "(not rescaled for the number of ranks)")
        return {"mode": self.mode, "world_size": self.world_size, "per_rank_batch_size": batch_size,
                "grad_accum": grad_accum, "effective_batch_size": effective, "lr": lr, "text": text}

    # -- data -------------------------------------------------------------------------------------
    def shard(self, rows: Sequence[T]) -> list[T]:
        """This rank's share of one global batch (see :mod:`.distributed_sampler`)."""
        return shard_rows(rows, self.rank, self.world_size)

    def model_device(self, default: torch.device) -> torch.device:
        """Where to build the model: this rank's device; the CPU under FSDP (sharding moves each rank's
        shards to its device, so no rank ever holds the whole model there)."""
        if not self.enabled:
            return default
        return torch.device("cpu") if self.fsdp else self.device

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device.type == "cpu":
            return batch
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # -- model ------------------------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to call for training steps: ``model`` itself, a DDP wrapper, or ``model`` sharded in place.

        Ranks above 0 also get their own random stream (seeded from the run's seed and the rank), so
        dropout masks differ between ranks as they would between rows of one big batch.
        """
        if not self.enabled:
            self.wrapped = model
            return model
        self.replicate(model, move=not self.fsdp)  # FSDP moves each unit's shards to the device itself
        if self.fsdp:
            self.wrapped = fsdp_lib.fully_shard_model(model, self.device.type, self.world_size, self.bf16)
        else:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # init_sync=False: every rank loaded the same base from disk; the trainable tensors were broadcast.
            self.wrapped = _ddp_class()(model, device_ids=ids, forward_sync_buffers=False, init_sync=False)
        return self.wrapped

    def replicate(self, model: nn.Module, move: bool = True) -> None:
        """Make ``model`` this rank's replica: its own random stream (ranks above 0), on this rank's device
        (``move``), with rank 0's trainable tensors. Loops that reduce gradients themselves (see
        :mod:`.grads`) call this instead of :meth:`wrap`."""
        if not self.enabled:
            return
        if self.rank > 0:
            torch.manual_seed(torch.initial_seed() + 1_000_003 * self.rank)
        if move:
            model.to(self.device)
        self.broadcast_trainable(model)

    @torch.no_grad()
    def broadcast_trainable(self, model: nn.Module) -> None:
        """Give every rank rank 0's trainable tensors (the delta's random init)."""
        import torch.distributed as dist

        with self.guard("broadcasting the trainable parameters"):
            for p in model.parameters():
                if p.requires_grad:
                    sent = p.data.to(self._comm_device())  # NCCL sends GPU tensors only
                    dist.broadcast(sent, src=0)
                    p.data.copy_(sent)

    @contextlib.contextmanager
    def grad_sync(self, module: nn.Module, sync: bool) -> Iterator[None]:
        """Skip the gradient all-reduce for accumulation micro-batches (``sync=False``); the last one syncs."""
        if sync or not self.enabled:
            yield
        elif self.fsdp:
            module.set_requires_gradient_sync(False)  # type: ignore[operator]
            try:
                yield
            finally:
                module.set_requires_gradient_sync(True)  # type: ignore[operator]
        else:
            with module.no_sync():  # type: ignore[operator]
                yield

    def autocast(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast when ``bf16`` is on (FSDP casts through its own policy instead)."""
        if self.bf16 and not self.fsdp:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loss_scale(self) -> float:
        """Factor on ``loss_r / N`` (``N`` summed over ranks) that undoes the gradient average over ranks."""
        return float(self.world_size)

    # -- communication ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Turn a failed collective inside the block into a :class:`DistributedError` with advice."""
        try:
            yield
        except DistributedError:
            raise
        except Exception as exc:
            if not self.enabled or not is_comm_failure(exc):
                raise
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise DistributedError(
                f"Rank {self.rank} of {self.world_size}: {what} failed because another rank stopped answering "
                f"(it died, was killed, or hung for over {self.timeout_s:g} s): {first}. The launcher's report "
                "names the rank that failed first; fix its error, then rerun the same command with --resume to "
                "continue from the last checkpoint."
            ) from exc

    def sum(self, *values: float) -> list[float]:
        """Each value summed over all ranks (one all-reduce)."""
        if not self.enabled:
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device())
        with self.guard("summing metrics over ranks"):
            dist.all_reduce(t)
        return t.cpu().tolist()

    def gather_objects(self, value: Any) -> list[Any]:
        """``[value of rank 0, value of rank 1, ...]`` on every rank (JSON-able values)."""
        if not self.enabled:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        with self.guard("gathering state from all ranks"):
            dist.all_gather_object(out, value)
        return out

    def barrier(self, what: str = "waiting for all ranks") -> None:
        if self.enabled:
            import torch.distributed as dist

            with self.guard(what):
                dist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def on_main(self, fn: Callable[[], T], what: str) -> T | None:
        """Run ``fn`` on rank 0 only; if it fails there, every rank stops (not just rank 0, leaving the
        others waiting). Returns ``fn``'s value on rank 0, ``None`` elsewhere."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
                error = exc
        if self.enabled:
            failure = self.gather_objects(None if error is None else f"{type(error).__name__}: {error}")[0]
            if failure is not None and error is None:
                raise DistributedError(f"Rank 0 failed while {what} ({failure}); rank {self.rank} stops as well.")
        if error is not None:
            raise error
        return result

    def close(self) -> None:
        """Leave the process group (after a successful run; a failed one just exits)."""
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    # -- state ------------------------------------------------------------------------------------
    def full_trainable(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Whole trainable tensors by name (all-gathered under FSDP: every rank must call)."""
        with self.guard("gathering the trainable tensors"):
            return fsdp_lib.full_trainable(model)

    def save_adapters(self, model: nn.Module, folder: Path) -> None:
        """Write every adapter of ``model`` under ``folder`` from rank 0 with whole tensors, then verify the files.

        Every rank must call this (gathering is a collective under FSDP). Rank 0 checks that each
        saved tensor is non-empty, has the parameter's full shape and equals the gathered value.
        """
        from ...checkpoint.io import WEIGHTS_NAME, adapter_folder
        from ...checkpoint.state import adapter_entries, save_adapter

        for name in list(model.peft_config):
            entries = adapter_entries(model.adapter_parts(name), name)
            with self.guard("gathering the adapter for saving"):
                tensors = {key: fsdp_lib.full_tensor(t) for key, (_, _, t) in entries.items()}
            if self.is_main:
                save_adapter(model.adapter_parts(name), name, folder, model.base_fingerprint(name), tensors=tensors)
                shapes = {key: tuple(t.shape) for key, (_, _, t) in entries.items()}  # global shapes, even for DTensors
                fsdp_lib.verify_saved(adapter_folder(folder, name) / WEIGHTS_NAME, tensors, shapes)
        self.barrier("waiting for rank 0 to save the adapter")


def _ddp_class() -> type:
    """``DistributedDataParallel`` that also answers the wrapped model's attributes (``base_model``, ...), so
    code written for a ``DeltaModel`` (e.g. a seq2seq model's ``prepare_decoder_input_ids_from_labels``) works."""
    from torch.nn.parallel import DistributedDataParallel

    class DeltaDDP(DistributedDataParallel):
        def __getattr__(self, name: str) -> Any:
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.module, name)

    return DeltaDDP


def check_bf16(bf16: bool) -> None:
    """Refuse ``bf16`` on a GPU without bfloat16 support (CPUs emulate it)."""
    if bf16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError("--bf16: this GPU has no bfloat16 support (it needs compute capability >= 8.0); drop --bf16.")
