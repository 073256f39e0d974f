"""Resumable sweeps: a sweep's finished rows in a safetensors file, written as it goes.

`activation_patching(..., checkpoint="run.safetensors")` keeps in the file every finished row's
statistic (`stats` [cells, pairs] and `have` [cells, pairs]) and every pair's clean and corrupt
statistic (`reference` [2, pairs], `have_reference` [pairs]), with a fingerprint of what was swept
in the metadata: nnpatch's version, the model (class, config, a checksum of its weights), the
prompt pairs and answers (a hash of their token ids), the site, `by`, the layers, the direction
and the metric. The same call after a crash or a kill loads the file, skips the rows already
done and writes on; a file from another model, other pairs or another site is refused. Each
write goes to a temporary file renamed over the old one, so a kill mid-write leaves the last
complete checkpoint. A finished sweep's file stays: calling again returns the grid from it.

    >>> import nnpatch, tempfile, pathlib
    >>> model, pairs = nnpatch.models.load("ioi"), nnpatch.tasks.ioi(2, template=0)
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.safetensors"
    >>> first = nnpatch.activation_patching(model, pairs, by="layer", checkpoint=path, progress=False)
    >>> again = nnpatch.activation_patching(model, pairs, by="layer", checkpoint=path, progress=False)
    >>> bool((first.values == again.values).all())
    True
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from ..errors import NNPatchValueError

SAVE_EVERY_S = 2.0  # between writes while rows finish; each part of pairs and the end always write
_FIELDS = ("stats", "have", "reference", "have_reference")


def version() -> str:
    """The installed nnpatch's version ("unknown" when run from a source tree never installed)."""
    from importlib.metadata import PackageNotFoundError, version as installed
    try:
        return installed("nnpatch")
    except PackageNotFoundError:
        return "unknown"


def fingerprint(job) -> dict[str, str]:
    """What a checkpoint must match to be resumed (and the ranks of a distributed sweep must
    share): one string per field."""
    module = job.module
    config = getattr(module, "config", None)
    config_text = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(config)
    weights = hashlib.sha256()
    for name, p in module.named_parameters():
        weights.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        if not p.is_meta:  # offloaded weights: their names and shapes only
            weights.update(repr(round(float(p.detach().flatten()[:64].double().sum()), 6)).encode())
    pairs = hashlib.sha256(json.dumps([job.clean_ids, job.corrupt_ids]).encode())
    for ids in (job.answer, job.wrong):
        pairs.update(json.dumps(None if ids is None else ids.tolist()).encode())
    return {
        "nnpatch": version(),
        "model": f"{type(module).__name__} {job.model_name}",
        "config": hashlib.sha256(config_text.encode()).hexdigest()[:16],
        "weights": weights.hexdigest()[:16],
        "pairs": f"{job.n_pairs} pairs, {pairs.hexdigest()[:16]}",
        "site": job.site_name,
        "by": ",".join(job.by),
        "layers": ",".join(map(str, job.layers)),
        "direction": job.direction,
        "metric": job.metric.name,
    }


class Checkpoint:
    """The checkpoint file of one sweep, bound to the sweep's `CellSink`."""

    def __init__(self, path, job, sink):
        if job.metric.fn is not None:
            raise NNPatchValueError(
                f"checkpoint= needs a named metric (one of the registry's, e.g. 'logit_diff'): a custom "
                f"metric function ({job.metric.name}) scores a cell from all its pairs' logits at once, "
                "which a checkpoint does not keep. Sweep without a checkpoint, or use a named metric")
        self.path, self.sink = Path(path), sink
        self.meta = fingerprint(job)
        self.last = time.monotonic()

    def load(self) -> bool:
        """Fill the sink from the file, if there is one; an error when it is another sweep's."""
        if not self.path.exists():
            return False
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise NNPatchValueError(f"checkpoint {self.path} cannot be read ({e}); it is not a sweep "
                                    "checkpoint, or it is damaged: delete it or give another path") from None
        differ = [k for k in self.meta if meta.get(k) != self.meta[k]]
        if differ:
            detail = "; ".join(f"{k}: file {meta.get(k)!r}, this sweep {self.meta[k]!r}" for k in differ)
            raise NNPatchValueError(
                f"checkpoint {self.path} was written by a different sweep ({detail}); it can only resume "
                "the same call on the same model. Give another checkpoint path, or delete the file to "
                "start over")
        for name in _FIELDS:
            have, want = tensors.get(name), getattr(self.sink, name)
            if have is None or have.shape != want.shape or have.dtype != want.dtype:
                raise NNPatchValueError(f"checkpoint {self.path} holds no {name} of shape "
                                        f"{tuple(want.shape)}; delete it or give another path")
            want.copy_(have)
        return True

    def save(self, force: bool = False) -> None:
        """Write the sink's rows so far (at most every SAVE_EVERY_S seconds, unless `force`)."""
        now = time.monotonic()
        if not force and now - self.last < SAVE_EVERY_S:
            return
        from safetensors.torch import save_file
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        save_file({name: getattr(self.sink, name).contiguous() for name in _FIELDS}, str(tmp), metadata=self.meta)
        os.replace(tmp, self.path)
        self.last = time.monotonic()
