"""Per-example adapter routing: which adapter each row of a batch uses (mixed-adapter batches).

``delta_model(**batch, adapter_names=[...])`` gives every example its own adapter (``"__base__"``:
none, the frozen model alone). :class:`~deltatune.model.DeltaModel` turns the names into a
:class:`Routing` and makes it current for the duration of the call (:func:`routed`, a context
variable: exception-safe, per thread); every delta reads it with :func:`current_routing` and serves
all rows at once with its own batched arithmetic (a gathered ``bmm`` per layer method; see each
method). The core only routes: it never knows what a method does with the rows.

A layer may see more rows than the call had examples: ``generate`` repeats each example for beam
search and ``num_return_sequences`` (``repeat_interleave``, so the copies of example ``b`` are rows
``b*k .. b*k + k - 1``). :meth:`Routing.rows` expands the index the same way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from .errors import AdapterNotFoundError, ConfigError

#: The name that selects the frozen base model for an example (HF peft's sentinel).
BASE = "__base__"


@dataclass(frozen=True)
class Routing:
    """Adapter slot of every example of one model call.

    Attributes:
        names: the distinct adapter names of the batch, in first-seen order (``BASE`` left out).
        index: ``(B,)`` long; ``names[index[b]]`` is example ``b``'s adapter, ``-1`` for the base model.
    """

    names: tuple[str, ...]
    index: torch.Tensor  # (B,)
    uniform: str | None = None  # the one name every example uses (BASE included); None when the batch mixes
    _slots: dict[tuple[object, ...], torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_names(cls, adapter_names: Sequence[str], known: Sequence[str]) -> Routing:
        """Validate ``adapter_names`` against the model's adapters (``known``) and index them."""
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise ConfigError(
                f"adapter_names must be a list with one adapter name per example (or {BASE!r}); got "
                f"{type(adapter_names).__name__}."
            )
        unknown = sorted({n for n in adapter_names if n != BASE and n not in known})
        if unknown:
            raise AdapterNotFoundError(
                f"adapter_names has unknown adapter(s) {unknown}; this model has {list(known)} "
                f"(and {BASE!r} for the base model alone)."
            )
        names = tuple(dict.fromkeys(n for n in adapter_names if n != BASE))
        slot = {n: i for i, n in enumerate(names)}
        index = torch.tensor([slot.get(n, -1) for n in adapter_names], dtype=torch.long)
        distinct = set(adapter_names)
        return cls(names, index, next(iter(distinct)) if len(distinct) == 1 else None)

    @property
    def batch_size(self) -> int:
        return int(self.index.shape[0])

    def name_of_row(self) -> list[str]:
        """Each example's adapter name (``BASE`` for the base model)."""
        return [self.names[i] if i >= 0 else BASE for i in self.index.tolist()]

    def rows(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        """Slot index ``(n,)`` for a tensor with ``n`` rows: the examples, or each repeated ``n / B`` times."""
        batch = self.batch_size
        if n % batch:
            raise ConfigError(
                f"A mixed-adapter batch has {batch} examples (adapter_names), but a layer received {n} rows; "
                "adapter_names needs one name per example, and the model must keep the batch dimension first."
            )
        index = self.index if n == batch else self.index.repeat_interleave(n // batch)
        return index if device is None else index.to(device)

    def slots(self, stack: Sequence[str], n: int, device: torch.device) -> torch.Tensor:
        """For each of ``n`` rows, the position of its adapter in ``stack``; ``len(stack)`` where ``stack``
        lacks it (the base model, or an adapter that does not touch this layer): ``(n,)`` long.

        Cached per call for each ``(stack, n, device)``: layers holding the same adapters share one index."""
        key = (tuple(stack), n, str(device))
        found = self._slots.get(key)
        if found is None:
            where = {name: i for i, name in enumerate(stack)}
            # one entry per routing slot, then the base (-1 indexes the last entry)
            lookup = torch.tensor([where.get(name, len(stack)) for name in self.names] + [len(stack)])
            found = lookup[self.rows(n)].to(device)
            self._slots[key] = found
        return found


_CURRENT: ContextVar[Routing | None] = ContextVar("deltatune_routing", default=None)


def current_routing() -> Routing | None:
    """The routing of the model call in progress (``None`` outside a mixed-adapter call)."""
    return _CURRENT.get()


@contextmanager
def routed(routing: Routing | None) -> Iterator[None]:
    """Make ``routing`` current inside the block; the previous one comes back on exit (also on errors)."""
    token = _CURRENT.set(routing)
    try:
        yield
    finally:
        _CURRENT.reset(token)
