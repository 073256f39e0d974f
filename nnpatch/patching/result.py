"""The result of a patching sweep: a grid of metric values with named, labelled axes.

    >>> import pathlib, tempfile, torch, nnpatch
    >>> result = nnpatch.PatchingResult(
    ...     values=torch.tensor([[0.1, 0.9], [0.0, 1.0]]), dims=("layer", "pos"),
    ...     labels={"layer": ["transformer.h.0.input", "transformer.h.1.input"], "pos": ["Mary", " ran"]},
    ...     clean_score=2.5, corrupt_score=-1.0, metric="logit_diff", site="resid_pre")
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "sweep.safetensors"
    >>> result.save(path)
    >>> nnpatch.PatchingResult.load(path).values[1, 1].item()
    1.0
    >>> fig = result.plot()          # a plotly Figure; fig.show() in a notebook

Files hold the values as safetensors and everything else as JSON in the safetensors header, so
loading one never runs pickle.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import NNPatchValueError
from .metrics import REGISTRY

_FORMAT = "nnpatch.PatchingResult/1"


@dataclass
class PatchingResult:
    """Metric values of a sweep, one per cell.

    `values` has one axis per entry of `dims` (e.g. `("layer", "pos")`); `labels[dim]` labels the
    entries of that axis: layers by their site (`transformer.h.3.mlp.output`), positions by their
    tokens, heads by number. `clean_score` and `corrupt_score` are the metric of the unpatched
    clean and corrupt runs, in the metric's raw units (for `logit_diff` the values are normalised
    so that corrupt is 0 and clean is 1). `method` is "activation" or "attribution".
    """

    values: torch.Tensor
    dims: tuple[str, ...]
    labels: dict[str, list[str]]
    clean_score: float
    corrupt_score: float
    metric: str = "logit_diff"
    site: str = ""
    method: str = "activation"
    direction: str = "denoise"
    n_pairs: int = 1
    layers: list[int] = field(default_factory=list)
    model: str = ""

    _EXTRA = {}  # a subclass's own fields that save/load keep: name -> type(s), as in _KINDS

    def __post_init__(self):
        self.values = torch.as_tensor(self.values).detach().float().cpu()
        self.dims = tuple(self.dims)
        if self.values.dim() != len(self.dims):
            raise NNPatchValueError(f"values of shape {tuple(self.values.shape)} need {self.values.dim()} "
                                    f"dims, got dims={self.dims}")
        for axis, dim in enumerate(self.dims):
            labels = self.labels.get(dim)
            if labels is None:
                self.labels[dim] = [str(i) for i in range(self.values.shape[axis])]
            elif len(labels) != self.values.shape[axis]:
                raise NNPatchValueError(f"{len(labels)} labels for dim {dim!r} of size {self.values.shape[axis]}")
        if not self.layers and "layer" in self.dims:
            self.layers = list(range(self.values.shape[self.dims.index("layer")]))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def top(self, k: int = 5) -> list[tuple[dict[str, str], float]]:
        """The k cells of largest absolute value, as ({dim: label}, value), largest first."""
        flat = self.values.flatten()
        order = flat.abs().argsort(descending=True)[:k]
        out = []
        for i in order.tolist():
            index = torch.unravel_index(torch.tensor(i), self.values.shape)
            out.append(({d: self.labels[d][int(j)] for d, j in zip(self.dims, index)}, float(flat[i])))
        return out

    @property
    def normalized(self) -> bool:
        """Whether `values` are stored normalised (corrupt 0, clean 1), as "logit_diff" is."""
        spec = REGISTRY.get(self.metric)
        return spec is not None and spec.normalized

    @property
    def span_defined(self) -> bool:
        """Whether clean and corrupt score apart, so that a fraction restored means something
        (their difference is more than a millionth of the larger score, or of 1)."""
        span = self.clean_score - self.corrupt_score
        return abs(span) > 1e-6 * max(1.0, abs(self.clean_score), abs(self.corrupt_score))

    def restored(self) -> torch.Tensor:
        """Each cell as the fraction of the clean behaviour it restores,
        (value - corrupt) / (clean - corrupt): 0 is the corrupt run, 1 the clean run. NaN
        everywhere when clean and corrupt score the same (`span_defined` is False).

            >>> import torch, nnpatch
            >>> r = nnpatch.PatchingResult(torch.tensor([[0.1, 0.3]]), ("layer", "pos"), {}, clean_score=0.5,
            ...                            corrupt_score=0.1, metric="prob")
            >>> r.restored()
            tensor([[0.0000, 0.5000]])
        """
        if not self.span_defined:
            return torch.full_like(self.values, float("nan"))
        if self.normalized:
            return self.values.clone()
        return (self.values - self.corrupt_score) / (self.clean_score - self.corrupt_score)

    def raw(self) -> torch.Tensor:
        """Each cell's metric in its own units (for a normalised metric, undone:
        corrupt + value * (clean - corrupt)); NaN where that cannot be recovered."""
        if not self.normalized:
            return self.values.clone()
        raw = self.corrupt_score + self.values * (self.clean_score - self.corrupt_score)
        return torch.where(torch.isfinite(raw), raw, torch.full_like(raw, float("nan")))

    def plot(self, **kwargs):
        """A plotly heatmap of the fraction restored (`heatmap.plot`: one diverging scale centred
        at 0, raw values on hover, token and index labels); `theme="dark"` for a dark figure."""
        from ..jupyter.heatmap import plot
        return plot(self, **kwargs)

    def __repr__(self) -> str:
        shape = " x ".join(f"{d} {n}" for d, n in zip(self.dims, self.values.shape))
        return (f"PatchingResult({self.method} patching of {self.site or 'a site'}, {shape}, "
                f"metric={self.metric}, {self.direction}, clean={self.clean_score:.4g}, "
                f"corrupt={self.corrupt_score:.4g}, {self.n_pairs} pair(s))")

    # -- files ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write a .safetensors file (values) whose header holds everything else as JSON."""
        from safetensors.torch import save_file
        meta = {"format": _FORMAT, "dims": list(self.dims), "labels": self.labels,
                "clean_score": self.clean_score, "corrupt_score": self.corrupt_score,
                "metric": self.metric, "site": self.site, "method": self.method,
                "direction": self.direction, "n_pairs": self.n_pairs, "layers": self.layers,
                "model": self.model, **{key: getattr(self, key) for key in self._EXTRA}}
        save_file({"values": self.values.contiguous()}, str(path), metadata={"nnpatch": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> "PatchingResult":
        """Read a file written by `save` (no pickle involved).

        Keys a newer nnpatch adds to the header are ignored; a file that is not a PatchingResult
        (another safetensors file, a truncated or edited one) raises one `NNPatchValueError`
        that names the file and what is wrong with it."""
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                if "nnpatch" not in header or "values" not in f.keys():
                    raise NNPatchValueError(f"{path} is not a PatchingResult file (no nnpatch header); "
                                            "write one with PatchingResult.save")
                values = f.get_tensor("values")
        except SafetensorError as e:
            raise NNPatchValueError(f"{path} is not a PatchingResult file (not readable as "
                                    f"safetensors: {e})") from None
        try:
            meta = json.loads(header["nnpatch"])
        except (ValueError, RecursionError):
            raise NNPatchValueError(f"{path}: the nnpatch header is not valid JSON") from None
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise NNPatchValueError(f"{path}: unknown PatchingResult format {found!r}; this nnpatch reads "
                                    f"{_FORMAT}")
        return cls(values=values, **_fields(meta, path, {**_KINDS, **cls._EXTRA}))


_KINDS = {"dims": list, "labels": dict, "clean_score": (int, float), "corrupt_score": (int, float),
          "metric": str, "site": str, "method": str, "direction": str, "n_pairs": int, "layers": list,
          "model": str}
_REQUIRED = ("dims", "labels", "clean_score", "corrupt_score")


def _fields(meta: dict, path, kinds: dict) -> dict:
    """The constructor arguments in a file's header, each checked for its type (`kinds`); keys
    this version does not know are dropped."""
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise NNPatchValueError(f"{path}: the nnpatch header lacks {', '.join(missing)}")
    out = {}
    for key, kind in kinds.items():
        if key not in meta:
            continue
        value = meta[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise NNPatchValueError(f"{path}: {key} in the nnpatch header is {type(value).__name__}, "
                                    f"expected {getattr(kind, '__name__', 'a number')}")
        out[key] = value
    if not all(isinstance(d, str) for d in out["dims"]):
        raise NNPatchValueError(f"{path}: dims in the nnpatch header must be names")
    if not all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in out["labels"].values()):
        raise NNPatchValueError(f"{path}: labels in the nnpatch header must be lists of strings")
    out["dims"] = tuple(out["dims"])
    return out
