"""FIFO queue of weak-view instance embeddings for Soft Semantic Alignment.

A plain object rather than an `nn.Module` buffer: the queue is training state, not part of the
model, and must stay outside the DeepSpeed engine (an engine-owned buffer would be cast to bf16,
partitioned under ZeRO-3 and broadcast from rank 0, none of which is wanted). The trainer saves
`state_dict()` with the checkpoint and restores it with `load_state_dict()`; the round trip is
exact: entries, fill level and write pointer.

Storage is a preallocated ring buffer `size x dim` (float32); `keys()` returns the current
entries ordered oldest first.
"""

from __future__ import annotations

from typing import Any

import torch


class EmbeddingQueue:
    def __init__(self, size: int, dim: int, *, device: torch.device | str = "cpu") -> None:
        if size < 0 or dim <= 0:
            raise ValueError(f"EmbeddingQueue: size must be >= 0 and dim > 0, got size={size}, dim={dim}")
        self.size = size
        self.dim = dim
        self._entries = torch.zeros(size, dim, dtype=torch.float32, device=device)  # size x dim
        self._fill = 0     # number of entries held, <= size
        self._pointer = 0  # slot the next entry is written to

    def __len__(self) -> int:
        return self._fill

    def push(self, embeddings: torch.Tensor) -> None:
        """Append N x dim embeddings (detached, stored as float32); the oldest entries beyond
        `size` are dropped. The queue moves to the embeddings' device on first use there."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"EmbeddingQueue.push: expected N x {self.dim} embeddings, got {tuple(embeddings.shape)}")
        count = embeddings.shape[0]
        if self.size == 0 or count == 0:
            return
        if embeddings.device != self._entries.device:
            self._entries = self._entries.to(embeddings.device)
        newest = embeddings.detach()[-self.size:].to(torch.float32)  # M x dim, M = min(N, size)
        kept = newest.shape[0]
        # entries pushed before the kept ones (count - kept of them) would have been overwritten anyway
        first_slot = (self._pointer + count - kept) % self.size
        slots = (first_slot + torch.arange(kept, device=self._entries.device)) % self.size  # M
        self._entries[slots] = newest
        self._pointer = (self._pointer + count) % self.size
        self._fill = min(self._fill + count, self.size)

    def keys(self) -> torch.Tensor:
        """Current entries, q x dim float32 (q = fill level), oldest first. A copy."""
        if self._fill < self.size:
            return self._entries[: self._fill].clone()
        # full: the oldest entry sits at the write pointer
        return torch.cat([self._entries[self._pointer:], self._entries[: self._pointer]], dim=0)

    def push_all_ranks(self, local: torch.Tensor) -> None:
        """All-gather every rank's N_r x dim embeddings (counts may differ) and push them in rank
        order, so every rank holds the identical queue. One process: a plain `push`."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            self.push(local)
            return
        from resam_dist.distributed import all_gather_variable

        if local.dim() != 2 or local.shape[1] != self.dim:
            raise ValueError(f"EmbeddingQueue.push_all_ranks: expected N x {self.dim}, got {tuple(local.shape)}")
        gathered = all_gather_variable(local.detach().to(torch.float32).contiguous())
        self.push(torch.cat(list(gathered), dim=0))

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "dim": self.dim, "entries": self._entries.detach().cpu().clone(),
                "fill": self._fill, "pointer": self._pointer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"size", "dim", "entries", "fill", "pointer"} - set(state)
        if missing:
            raise ValueError(f"EmbeddingQueue.load_state_dict: missing keys {sorted(missing)}")
        if state["size"] != self.size or state["dim"] != self.dim:
            raise ValueError(f"EmbeddingQueue.load_state_dict: checkpoint queue is {state['size']} x {state['dim']}, "
                             f"this run's is {self.size} x {self.dim} (resam.queue_size / model embed dim differ)")
        entries = state["entries"]
        if tuple(entries.shape) != (self.size, self.dim):
            raise ValueError(f"EmbeddingQueue.load_state_dict: entries have shape {tuple(entries.shape)}, "
                             f"expected {(self.size, self.dim)}")
        fill, pointer = int(state["fill"]), int(state["pointer"])
        if not (0 <= fill <= self.size and 0 <= pointer < max(self.size, 1)):
            raise ValueError(f"EmbeddingQueue.load_state_dict: fill {fill} / pointer {pointer} out of range "
                             f"for size {self.size}")
        self._entries = entries.to(device=self._entries.device, dtype=torch.float32).clone()
        self._fill = fill
        self._pointer = pointer
