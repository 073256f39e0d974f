"""How much of a sweep fits in memory: pairs per streamed chunk and patched runs per batch.

A sweep holds, for the pairs it is working on, what its patched runs reuse (each block's input in
the base run, the site's values in both runs, the key/value cache, the last-position logits), and
runs a batch of patched runs at a time. `Budget` sizes both from a number of bytes: given as
`memory_budget=`, or by default half the memory free on the device the model's inputs go to (at
the start of the sweep; on the CPU at most 1 GiB unless one pair needs more, as bigger CPU
batches run slower). Half of the budget holds the streamed pairs' references, the other half a
batch of patched runs, so a sweep over 512 pairs of long prompts runs in chunks of pairs instead
of failing with out-of-memory. The estimates count activations, not the model's weights (already
loaded when the sweep starts).

    >>> import nnpatch
    >>> from nnpatch.patching.job import Job
    >>> from nnpatch.patching.memory import Budget
    >>> model = nnpatch.models.load("ioi")
    >>> pairs = nnpatch.tasks.ioi(4, template=0)
    >>> job = Job(model, pairs, None, None, None, "logit_diff", "resid_pre", ("layer", "pos"), "denoise", None)
    >>> budget = Budget(job, 64 << 20)
    >>> budget.pairs(job.seq_len) >= 4, budget.rows(job.seq_len) > 1
    (True, True)
"""
from __future__ import annotations

import os

import torch

from ..errors import NNPatchValueError


CPU_DEFAULT = 1 << 30  # the default budget's cap on the CPU (see Budget._default)


def free_bytes(device: torch.device) -> int:
    """Memory free on `device` now: CUDA's free memory, else the host's available memory."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30  # no way to ask this system: assume a small machine


class Budget:
    """Bytes a sweep may use for activations, and what fits in them for one job."""

    def __init__(self, job, memory_budget: int | None = None):
        self.job = job
        if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int)
                                          or memory_budget <= 0):
            raise NNPatchValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}; "
                                    "e.g. memory_budget=8 << 30 for 8 GiB, or leave it out to use half "
                                    "the free memory of the model's device")
        config = getattr(job.module, "config", None)
        self.d = getattr(config, "hidden_size", None) or 1024
        self.d_ff = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                     or 4 * self.d)
        self.heads = getattr(config, "num_attention_heads", None) or 16
        kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        head_dim = getattr(config, "head_dim", None) or self.d // self.heads
        self.kv = kv_heads * head_dim
        self.n_layers = job.table.n_layers
        param = next((p for p in job.module.parameters() if p.is_floating_point()), None)
        self.elem = param.element_size() if param is not None else 4
        self.bytes = int(memory_budget) if memory_budget is not None else self._default()

    def _default(self) -> int:
        """Half the free memory of the input device. On the CPU, at most CPU_DEFAULT unless one
        pair needs more: bigger CPU batches run slower per token (benchmarks/sweep.py, GPT-2
        small shape: 35 s of CPU time with 1 GiB against 42-49 s with half of 24 GiB)."""
        free = free_bytes(self.job.device) // 2
        if self.job.device.type != "cpu":
            return free
        longest = max(g.clean.shape[1] for g in self.job.groups)
        return min(free, max(CPU_DEFAULT, 4 * self.pair_bytes(longest)))

    def row_bytes(self, seq: int) -> int:
        """One patched run in a batch: one block's activations at a time (MLP, attention scores),
        the residual stream and the key/value cache it builds, and its logits."""
        acts = seq * (self.d_ff + 6 * self.d) + self.heads * seq * seq + 2 * self.n_layers * seq * self.kv
        logits = 4 * self.job.vocab if self.job.metric.mode == "logits" else 0
        return self.elem * (acts + 2 * self.n_layers * seq * self.d) + logits

    def pair_bytes(self, seq: int) -> int:
        """One pair's references, kept while its patched runs go (every block's input, the swept
        sites' values in both runs, the key/value cache, two rows of logits), plus its rows of
        the reference forwards."""
        kept = seq * (self.n_layers * self.d + 2 * len(self.job.layers) * self.d + 2 * self.n_layers * self.kv)
        return self.elem * kept + 2 * 4 * self.job.vocab + self.row_bytes(seq)

    def rows(self, seq: int) -> int:
        """Patched runs of `seq` tokens per batch: as many as half the budget holds."""
        return max(1, self._fit(self.row_bytes(seq), seq, "one patched run"))

    def pairs(self, seq: int) -> int:
        """Pairs of `seq` tokens per streamed chunk: as many as half the budget holds."""
        return self._fit(self.pair_bytes(seq), seq, "one prompt pair's reference runs")

    def _fit(self, unit: int, seq: int, what: str) -> int:
        n = (self.bytes // 2) // unit
        if n < 1:
            raise NNPatchValueError(
                f"memory_budget={self.bytes:,} bytes is too small for {what} of {seq} tokens on "
                f"{type(self.job.module).__name__} ({self.n_layers} layers, width {self.d}): it needs "
                f"about {unit:,} bytes, and a sweep spends half its budget on each of its references "
                f"and its patched runs; give memory_budget >= {2 * unit:,} or shorter prompts")
        return int(n)
