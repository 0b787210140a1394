"""`--shard K/N`: a deterministic slice of a command's work, for job arrays (Slurm, CI matrices, Kubernetes).

Shard K of N (K counts from 0, as `SLURM_ARRAY_TASK_ID` with `--array=0-3` and Kubernetes'
`JOB_COMPLETION_INDEX` do) takes the K-th of N contiguous, near-equal blocks of the command's
units of work. A unit is what must stay together: one dump for capture, one vectorised chunk of
dumps for attack (so a shard's chunks are exactly the unsharded run's), one reconstruction for
evaluate. The slice depends only on the list of units, never on what is already done, so a
preempted shard resumed with `--resume` finishes the same slice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence, TypeVar

from precode_cli.errors import UserError

T = TypeVar("T")
MAX_SHARDS = 100_000


@dataclass(frozen=True)
class Shard:
    """Shard `index` (0-based) of `count`."""

    index: int
    count: int

    @property
    def label(self) -> str:
        """The shard's name in files and messages: "1-of-4"."""
        return f"{self.index}-of-{self.count}"

    def take(self, units: Sequence[T]) -> list[T]:
        """This shard's contiguous block of `units`; blocks differ in length by at most one."""
        n = len(units)
        return list(units[self.index * n // self.count:(self.index + 1) * n // self.count])


def parse(text: str | None) -> Shard | None:
    """`--shard K/N` as a Shard; None without the option."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9]{1,6})\s*/\s*([0-9]{1,6})\s*", str(text))
    if not match:
        raise UserError(f"--shard must be K/N with 0 <= K < N (e.g. 0/4 for the first of four), not {str(text)[:40]!r}.")
    index, count = int(match.group(1)), int(match.group(2))
    if not 1 <= count <= MAX_SHARDS or index >= count:
        raise UserError(f"--shard {index}/{count} is out of range; K counts from 0 to N-1 and N is 1 to {MAX_SHARDS:,}.")
    return Shard(index, count)
