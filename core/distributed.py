"""Training on several processes under PyTorch's launcher (torchrun): who this process is, the process
group, and the few collectives the trainer needs.

One process (no ``WORLD_SIZE`` above 1 in the environment): ``join`` returns ``Ranks()``, whose methods
return their input untouched; nothing of ``torch.distributed`` runs, so one process does no extra work.

N processes (``python -m torch.distributed.run --standalone --nproc-per-node N ...``): torchrun gives
each its ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and a rendezvous; ``join`` starts the default process
group on them: gloo on a CPU; on CUDA ``cpu:gloo,cuda:nccl`` (the gradients travel over NCCL, the small
flags and sums over gloo, with no GPU round trip), each rank on ``cuda:LOCAL_RANK``. Every collective
waits at most the group's timeout (``train.rank_timeout_s``), so a rank that died or hangs cannot stall
the others for ever: the failure is a ``RankFailure`` naming the ranks whose processes have ended.

Why the gradients are summed by hand (``sync_gradients``) rather than by ``DistributedDataParallel``:
only the adapter's parameters train, a few MB, so one all-reduce of one flat buffer per optimiser step
costs next to nothing, and DDP's overlap of communication with the backward pass would buy little. The
trainer calls the backbone and the LM head itself (``head_loss``), not the model's ``forward`` that DDP
wraps; and a rank's micro-batches are cut by tokens (``core.train.pack_micro_batches``), so ranks do
not run the same number of backward passes, which DDP's per-backward reducer (and ``no_sync``) assumes.
Summing after the accumulation makes every rank's gradient that of the whole global batch, exactly what
one process computes, so clipping and the optimiser step are the same on every rank. On CUDA the step's
sum of losses (gloo, CPU) follows the NCCL launch without waiting for the GPU, so a rank that died
during the step shows as a gloo error on the CPU rather than as a wait inside NCCL.
"""

from __future__ import annotations

import datetime
import os
import random
import socket
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from .devices import error_line

DEATH_WAIT_S = 2.0  # a peer's socket closes an instant before its process is seen to end


def world_size() -> int:
    """How many training processes the launcher started (``WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE") or 1)


class RankFailure(RuntimeError):
    """A collective failed: another rank died (the message names it), or did not answer in time."""


def _ended(pid: int) -> bool:
    """Whether process ``pid`` of this host has exited (gone, or a zombie its parent has not reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # someone else's process: alive
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


@dataclass
class Ranks:
    """This process's place among the training processes, and the collectives between them."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    timeout_s: float = 0.0
    owner: bool = False  # this object started the process group; ``leave`` ends it
    peers: list[tuple[int, int]] = field(default_factory=list)  # (host hash, pid) of every rank

    @property
    def main(self) -> bool:
        """Rank 0: the one process that reports, writes files and decides when to stop."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """``device`` for this rank: ``cuda:LOCAL_RANK`` for CUDA, else as given."""
        return torch.device("cuda", self.local_rank) if device.type == "cuda" else device

    # ------------------------------------------------------------------------------------ collectives
    @contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except RuntimeError as err:  # DistBackendError, DistNetworkError and gloo's own are RuntimeErrors
            raise self._failure(what, err) from err

    def _failure(self, what: str, err: BaseException) -> RankFailure:
        """The ``RankFailure`` for ``err`` met while ``what``: which ranks died, else that one is stuck."""
        host = zlib.crc32(socket.gethostname().encode())
        mine = [(r, pid) for r, (h, pid) in enumerate(self.peers) if h == host and r != self.rank]
        deadline = time.monotonic() + DEATH_WAIT_S
        dead: list[tuple[int, int]] = []
        while not dead and time.monotonic() < deadline:
            dead = [(r, pid) for r, pid in mine if _ended(pid)]
            if not dead:
                time.sleep(0.05)
        cause = error_line(err)
        if dead:
            names = ", ".join(f"rank {r} (pid {pid})" for r, pid in dead)
            verb = "has" if len(dead) == 1 else "have"
            return RankFailure(f"{names} {verb} died; rank {self.rank} stopped while {what} ({cause})")
        return RankFailure(f"rank {self.rank} stopped while {what} ({cause}); no other rank's process on "
                           f"this host has ended, so one may be stuck (each wait is limited to "
                           f"train.rank_timeout_s = {self.timeout_s:g} s)")

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag``, on every rank (a decision only rank 0 takes: start, stop).

        A sum to which the other ranks add 0, not a broadcast: a broadcast's sender can finish without
        hearing from a rank that has died, a sum cannot, so no rank goes on (or stops) believing the
        others did too.
        """
        if self.world == 1:
            return flag
        value = torch.tensor([int(flag) if self.main else 0], dtype=torch.int64)
        with self._collective("deciding with the other ranks whether to go on"):
            dist.all_reduce(value)
        return bool(value.item())

    def sum(self, values: list[float]) -> list[float]:
        """Each of ``values`` summed over the ranks (in float64)."""
        if self.world == 1:
            return values
        total = torch.tensor(values, dtype=torch.float64)
        with self._collective("summing losses and counts"):
            dist.all_reduce(total)
        return total.tolist()

    def same(self, values: list[float]) -> bool:
        """Whether every rank holds the same ``values`` (a digest of what each read by itself)."""
        if self.world == 1:
            return True
        high = torch.tensor(values, dtype=torch.float64)
        low = -high
        with self._collective("comparing what the ranks loaded"):
            dist.all_reduce(high, dist.ReduceOp.MAX)
            dist.all_reduce(low, dist.ReduceOp.MAX)
        return torch.equal(high, -low)

    def sync_gradients(self, params: list[nn.Parameter]) -> None:
        """Replace each parameter's gradient by its sum over the ranks: one all-reduce per dtype.

        A parameter no example of this rank reached (no gradient here) adds zeros.
        """
        if self.world == 1:
            return
        for group in _by_dtype(params):
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
            with self._collective("summing gradients"):
                dist.all_reduce(flat)
            for p, grad in zip(group, flat.split([p.numel() for p in group])):
                p.grad = grad.view_as(p)

    @torch.no_grad()
    def broadcast_params(self, params: list[nn.Parameter]) -> None:
        """Give every rank rank 0's values of ``params`` (the adapter's random initialisation)."""
        if self.world == 1:
            return
        for group in _by_dtype(params):
            flat = torch.cat([p.reshape(-1) for p in group])
            with self._collective("receiving the adapter's weights from rank 0"):
                dist.broadcast(flat, 0)
            for p, value in zip(group, flat.split([p.numel() for p in group])):
                p.copy_(value.view_as(p))

    def seed_step(self, seed: int, step: int) -> None:
        """Seed the random numbers (dropout) of this rank's optimiser step ``step``, on ranks after the first.

        Rank 0 draws from the generator a single process uses, the one a checkpoint saves; every other
        rank from (seed, rank, step). So a checkpoint is the same whatever the number of processes, and
        a run resumed from it on any number repeats the numbers of an uninterrupted run.
        """
        if self.rank == 0:
            return
        derived = (seed * 1_000_003 + self.rank) * 1_000_003 + step
        torch.manual_seed(derived % 2**63)
        random.seed(derived)

    def leave(self) -> None:
        """End the process group if ``join`` started it here."""
        if self.owner and dist.is_initialized():
            dist.destroy_process_group()
        self.owner = False


def _by_dtype(params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
    groups: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault(p.dtype, []).append(p)
    return list(groups.values())


def join(device: torch.device, timeout_s: float) -> Ranks:
    """This process's ``Ranks``; under torchrun, the process group started (or joined, if started already).

    ``device``: where the run computes (CUDA: NCCL for the gradients, this rank on ``cuda:LOCAL_RANK``).
    ``timeout_s``: the longest any rank waits for the others, at the start and at every collective.
    """
    world = world_size()
    if world == 1:
        return Ranks(timeout_s=timeout_s)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK") or 0)
    ranks = Ranks(rank=rank, local_rank=local_rank, world=world, timeout_s=timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        except RuntimeError as err:
            raise RankFailure(f"rank {rank} could not join the other {world - 1} within "
                              f"{timeout_s:g} s ({error_line(err)})") from err
        ranks.owner = True
    me = torch.tensor([zlib.crc32(socket.gethostname().encode()), os.getpid()], dtype=torch.int64)
    table = [torch.zeros_like(me) for _ in range(world)]
    with ranks._collective("meeting the other ranks"):
        dist.all_gather(table, me)
    ranks.peers = [(int(h), int(pid)) for h, pid in table]
    return ranks
