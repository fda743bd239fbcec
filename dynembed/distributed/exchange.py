"""Collectives of the row exchange: variable-sized all-to-all and all-gather, counted.

Every rank calls these in the same order (the modules' lookups run in the same order on
every rank). Sizes travel first (one small all-to-all), then the payload in one call, so a
lookup costs two collectives each way. Bytes sent and received are counted for
:class:`Traffic` (benchmarks report bytes exchanged per step).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

# torch 2.13 renamed all_gather_into_tensor (which now warns) to all_gather_single
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class Traffic:
    """Bytes this rank sent to and received from other ranks through the row exchange
    (its own part, which stays local, is not counted)."""

    sent: int = 0
    received: int = 0
    exchanges: int = 0
    """Payload collectives run (each lookup and each backward is one or two); the size
    exchanges before them count in the bytes, not here."""

    def reset(self) -> None:
        """Sets every counter to zero."""
        self.sent = self.received = self.exchanges = 0


class Exchange:
    """All-to-all and all-gather of variable-sized row blocks within one process group.

    Args:
        group: the process group (its own, so row traffic never interleaves with DDP's
            gradient all-reduce on the default group).
        rank, world_size: this process's place in ``group``.
    """

    def __init__(self, group, rank: int, world_size: int) -> None:
        self.group, self.rank, self.world_size = group, rank, world_size
        self.traffic = Traffic()

    def splits(self, send: np.ndarray, tag: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Sizes each rank sends to this one, and every rank's ``tag``.

        The tag rides along with the sizes (no extra collective) so that a caller can check
        that every rank entered the same collective for the same purpose: ranks that pair
        different calls (another module, or eval on one rank and training on another)
        would otherwise swap payloads of other sizes, which gloo answers by aborting the
        process, or, when the sizes happen to match, by silently mixing up rows.

        Args:
            send: (W,) sizes this rank sends to each rank.
            tag: int64 describing the call (equal on every rank when they are in step).

        Returns:
            ((W,) int64 sizes each rank sends to this one, (W,) int64 tag of each rank).
        """
        message = np.empty((self.world_size, 2), dtype=np.int64)
        message[:, 0], message[:, 1] = send, tag
        out = torch.empty((self.world_size, 2), dtype=torch.int64)
        dist.all_to_all_single(out, torch.from_numpy(message), group=self.group)
        self._count(16 * (self.world_size - 1), 16 * (self.world_size - 1), payload=False)
        out = out.numpy()
        return out[:, 0].copy(), out[:, 1].copy()

    def all_to_all(self, rows: torch.Tensor, send: np.ndarray, recv: np.ndarray) -> torch.Tensor:
        """Sends ``rows[sum(send[:r]) : sum(send[:r+1])]`` to rank r.

        Args:
            rows: (sum(send), *trailing) contiguous CPU tensor, grouped by destination.
            send: (W,) rows for each rank.
            recv: (W,) rows from each rank (see :meth:`splits`).

        Returns:
            (sum(recv), *trailing), grouped by source rank.
        """
        rows = rows.contiguous()
        out = rows.new_empty((int(recv.sum()), *rows.shape[1:]))
        dist.all_to_all_single(out, rows, output_split_sizes=recv.tolist(),
                               input_split_sizes=send.tolist(), group=self.group)
        row_bytes = rows[:1].numel() * rows.element_size() if rows.dim() > 1 else \
            rows.element_size()
        self._count(int(send.sum() - send[self.rank]) * row_bytes,
                    int(recv.sum() - recv[self.rank]) * row_bytes)
        return out

    def all_gather(self, rows: torch.Tensor,
                   sizes: np.ndarray | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """Every rank's ``rows``, concatenated in rank order.

        Args:
            rows: (n_r, *trailing) CPU tensor (n_r may differ by rank).
            sizes: (W,) n_r of every rank when the caller knows them (saves a collective).

        Returns:
            ((sum n_r, *trailing) tensor, (W,) int64 n_r of each rank).
        """
        if sizes is None:
            gathered = torch.zeros(self.world_size, dtype=torch.int64)
            _all_gather(gathered, torch.tensor([rows.shape[0]], dtype=torch.int64),
                        group=self.group)
            sizes = gathered.numpy()
            self._count(8 * (self.world_size - 1), 8 * (self.world_size - 1), payload=False)
        longest = int(sizes.max()) if sizes.shape[0] else 0
        if rows.shape[0] == longest:  # no padding to write
            padded = rows.contiguous()
        else:
            padded = rows.new_empty((longest, *rows.shape[1:]))
            padded[:rows.shape[0]] = rows
            padded[rows.shape[0]:] = 0
        out = rows.new_empty((self.world_size * longest, *rows.shape[1:]))
        _all_gather(out, padded, group=self.group)
        if (sizes == longest).all():
            gathered = out  # every part is whole
        else:  # each rank's part by a slice (an index of every element cost 54 ms)
            gathered = torch.cat([out[r * longest:r * longest + int(sizes[r])]
                                  for r in range(self.world_size)])
        row_bytes = padded[:1].numel() * padded.element_size() if padded.dim() > 1 else \
            padded.element_size()
        self._count((self.world_size - 1) * longest * row_bytes,
                    (self.world_size - 1) * longest * row_bytes)
        return gathered, sizes

    def all_reduce_max(self, values: np.ndarray) -> np.ndarray:
        """Element-wise maximum of (k,) int64 ``values`` over the ranks."""
        tensor = torch.from_numpy(np.array(values, dtype=np.int64))
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return tensor.numpy()

    def _count(self, sent: int, received: int, *, payload: bool = True) -> None:
        self.traffic.sent += sent
        self.traffic.received += received
        self.traffic.exchanges += payload
