"""Distributed sweeps on torch.distributed: the work shared across ranks, one grid gathered.

Under `torchrun --nproc-per-node N script.py` (or any launcher that sets RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT, or with a process group already initialised), an
`activation_patching(..., distributed=True)` call (or `distributed=None`, the default, which
detects that environment) runs on every rank with the model on the rank's own device (e.g.
`model.to(f"cuda:{LOCAL_RANK}")`). Pairs are shared out (rank r takes pairs r, r+N, ...); with
fewer pairs than ranks, cells are. Each rank sweeps its share, then every rank gets the same full
`PatchingResult` (the statistics are summed over ranks, so rank 0 and the others hold the same
grid). Before any work the ranks compare what they are about to sweep (nnpatch's version, the
model's class, config and weight checksum, the pairs, the site...) and refuse to run when they
differ. An error on one rank is caught, every rank learns of it at the next gathering, and every
rank raises it naming the rank: no rank waits forever for another. Progress is one bar on rank
0, counting every rank's finished runs (through the process group's key-value store).

    >>> from nnpatch.patching.distributed import ranks_for
    >>> ranks_for(None) is None      # no torchrun environment: a plain one-process sweep
    True
"""
from __future__ import annotations

import atexit
import datetime
import itertools
import os
import time

import torch

from ..errors import NNPatchError, NNPatchValueError

_sweeps = itertools.count()  # every rank calls the same sweeps in the same order: a shared key


def ranks_for(distributed: bool | None) -> "Ranks | None":
    """The ranks of this sweep: None for a one-process sweep. `distributed=None` detects a
    process group or torchrun's environment; True requires one; False never distributes."""
    import torch.distributed as dist
    if distributed is False:
        return None
    launched = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    ready = dist.is_available() and dist.is_initialized()
    if not ready and not launched:
        if distributed:
            raise NNPatchValueError(
                "distributed=True needs torch.distributed: start the script with torchrun "
                "(torchrun --nproc-per-node 2 script.py, or nnpatch sweep --nproc 2), or call "
                "torch.distributed.init_process_group first")
        return None
    if not ready:
        # gloo: a sweep exchanges a few small CPU tensors, whatever device the model is on. A
        # process group started before the sweep (e.g. nccl) is used as it is.
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
        atexit.register(_close)
    if dist.get_world_size() == 1 and not distributed:
        return None
    return Ranks()


def _close() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


class Ranks:
    """This process's rank among `world`, and the collective steps of a sweep."""

    def __init__(self):
        import torch.distributed as dist
        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.key = f"nnpatch/sweep{next(_sweeps)}"
        self.on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")  # where collectives take their tensors

    def together(self, fn):
        """Run `fn` here; every rank then learns whether any rank failed, and every rank raises
        the first failure, naming the rank (the failing rank re-raises its own error)."""
        error = None
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001  every rank must reach the gathering below
            error, out = e, None
        messages = [None] * self.world
        self.dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = next(((r, m) for r, m in enumerate(messages) if m is not None), None)
        if failed is not None:
            raise NNPatchError(f"rank {failed[0]} of {self.world} failed, so the distributed sweep stops "
                               f"on every rank: {failed[1]}")
        return out

    def check_same(self, meta: dict[str, str]) -> None:
        """An error on every rank when any rank sweeps something else than rank 0."""
        metas = [None] * self.world
        self.dist.all_gather_object(metas, meta)
        for r, other in enumerate(metas):
            differ = [k for k in meta if other.get(k) != metas[0].get(k)]
            if differ:
                detail = "; ".join(f"{k}: rank 0 {metas[0].get(k)!r}, rank {r} {other.get(k)!r}" for k in differ)
                raise NNPatchValueError(
                    f"the ranks of a distributed sweep must run the same sweep on the same model, but rank "
                    f"{r} differs from rank 0 ({detail}); install the same nnpatch, load the same weights "
                    "and pass the same arguments on every rank")

    def share(self, n_pairs: int, n_cells: int) -> tuple[list[int] | None, list[int] | None]:
        """(pairs, cells) of this rank: pairs r, r+N, ... and every cell; with fewer pairs than
        ranks, every pair and cells r, r+N, ... An error when there are fewer of both than ranks."""
        if n_pairs >= self.world:
            return list(range(self.rank, n_pairs, self.world)), None
        if n_cells >= self.world:
            return None, list(range(self.rank, n_cells, self.world))
        raise NNPatchValueError(
            f"{self.world} ranks for a sweep of {n_pairs} pair(s) x {n_cells} cell(s): every rank needs "
            f"pairs or cells of its own; run at most {max(n_pairs, n_cells)} processes, or sweep more "
            "pairs or cells")

    def gather(self, sink) -> None:
        """Sum the ranks' statistics; every row and every pair's references were run somewhere."""
        fields = [sink.stats, sink.have.float(), sink.reference * sink.have_reference, sink.have_reference.float()]
        summed = []
        for t in fields:
            t = t.to(self.on)
            self.dist.all_reduce(t)
            summed.append(t.cpu())
        stats, have, reference, have_reference = summed
        missing = int((have == 0).sum()) + int((have_reference == 0).sum())
        if missing or bool((have > 1).any()):
            raise NNPatchError(f"the distributed sweep lost or doubled {missing or int((have > 1).sum())} "
                               "rows; this is a bug in nnpatch, please report it")
        sink.stats.copy_(stats)
        sink.have.fill_(True)
        sink.reference.copy_(reference / have_reference)  # ranks sharing cells all ran every pair
        sink.have_reference.fill_(True)

    def progress(self, bar):
        """`bar` counting every rank's runs: this rank's counts go to the store; rank 0 shows the
        sum. Other ranks pass bar=None."""
        try:
            store = self.dist.distributed_c10d._get_default_store()
        except (AttributeError, RuntimeError):  # a torch without it: each rank counts its own
            return bar if bar is not None else _Silent()
        return _SharedBar(store, self.key, bar, self.world)


class _Silent:
    total = 0

    def update(self, n):
        pass

    def refresh(self):
        pass

    def close(self):
        pass


class _SharedBar:
    """A progress bar whose counts are summed over ranks in the key-value store."""

    def __init__(self, store, key, bar, world):
        self.store, self.key, self.bar, self.world = store, key, bar, world
        self._total = 0

    @property
    def total(self):
        return self._total

    @total.setter
    def total(self, value):
        self.store.add(f"{self.key}/total", int(value) - self._total)
        self._total = int(value)

    def update(self, n):
        self.store.add(f"{self.key}/done", int(n))
        self.refresh()

    def refresh(self):
        if self.bar is None:
            return
        done, total = self.store.add(f"{self.key}/done", 0), self.store.add(f"{self.key}/total", 0)
        self.bar.total = total
        self.bar.update(done - getattr(self.bar, "n", getattr(self.bar, "done", 0)))

    def close(self):
        """Rank 0 waits for every rank to finish (or fail) before closing its bar."""
        self.store.add(f"{self.key}/finished", 1)
        if self.bar is None:
            return
        while self.store.add(f"{self.key}/finished", 0) < self.world:
            self.refresh()
            time.sleep(0.05)
        self.refresh()
        self.bar.close()
