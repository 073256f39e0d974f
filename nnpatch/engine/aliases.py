"""`rename={...}`: extra names for modules, e.g. one spelling of the blocks across architectures.

`nnpatch.LanguageModel(hf, rename={"transformer.h": "layers", "attn": "attention"})` lets
`model.layers[0].attention` stand for `model.transformer.h[0].attn`. Each key is a module path
read from every envoy of the tree: a one-part key (`"attn"`) names that child wherever there is one,
a dotted key (`"transformer.h"`) the module it reaches from where it resolves, here the root. The
alias is a name on that envoy; a dotted alias binds its last part on the envoy its prefix names
(`{"attn.c_proj": "attn.o_proj"}` makes `...attn.o_proj`). A key that resolves nowhere is
skipped, so that one dict can cover architectures that spell a module differently.

An alias leads to the module's own envoy, so paths in errors, caches and hooks stay the
`named_modules()` paths (`transformer.h.0`), and a path string may use aliases anywhere a module
path is taken (`tracer.cache(modules=["layers.0"])`). An alias that would hide a child module, an
attribute of the module or an envoy method is an error when the model is wrapped.

Example:
    >>> import torch, nnpatch
    >>> net = nnpatch.Model(torch.nn.Sequential(torch.nn.Linear(3, 3)), rename={"0": "first"})
    >>> net.first
    <Envoy 0: Linear>
"""
from __future__ import annotations

import torch

from ..errors import NNPatchTypeError, NNPatchValueError


def check(module: torch.nn.Module, rename, envoy_names) -> dict[str, tuple[str, ...]]:
    """`rename` as {key: aliases}, after checking that no alias hides something on any envoy."""
    if rename is None:
        return {}
    if not isinstance(rename, dict):
        raise NNPatchTypeError(f"rename= takes a dict {{module path: alias or [aliases]}}, got {type(rename).__name__}")
    table = {}
    for key, aliases in rename.items():
        aliases = (aliases,) if isinstance(aliases, str) else tuple(aliases)
        if not isinstance(key, str) or not all(isinstance(a, str) and a for a in aliases):
            raise NNPatchTypeError(f"rename={{{key!r}: {aliases!r}}}: keys are module paths and aliases are names (strings)")
        table[key] = aliases
    for path, host in module.named_modules():
        for key, aliases in table.items():
            for alias in aliases:
                found = _binding(table, host, path, key, alias)
                if found is None:
                    continue
                name, _ = found
                if name in host._modules or hasattr(host, name) or name in envoy_names:
                    raise NNPatchValueError(
                        f"rename alias {alias!r} for {key!r} would hide {name!r} on {path or 'the model'} "
                        f"({type(host).__name__}), which already has a child or attribute of that "
                        "name; pick another alias")
    return table


def lookup(table: dict, module: torch.nn.Module, path: str, name: str) -> str | None:
    """The path, relative to the envoy at `path`, that alias `name` leads to there, if any."""
    for key, aliases in table.items():
        for alias in aliases:
            found = _binding(table, module, path, key, alias)
            if found is not None and found[0] == name:
                return found[1]
    return None


def names_at(table: dict, module: torch.nn.Module, path: str) -> list[str]:
    """The aliases bound on the envoy at `path` (for the nearest names in errors)."""
    found = (_binding(table, module, path, key, alias) for key, aliases in table.items() for alias in aliases)
    return [f[0] for f in found if f is not None]


def _binding(table, host: torch.nn.Module, path: str, key: str, alias: str):
    """(name bound on `host`, relative path it leads to) for one key and alias, or None."""
    if "." in alias:
        prefix, _, name = alias.rpartition(".")
        if not key.startswith(prefix + "."):
            raise NNPatchValueError(
                f"rename alias {alias!r} for {key!r}: a dotted alias binds its last part on the "
                f"module its prefix names, so the key must start with {prefix!r}")
        if not (path == prefix or path.endswith("." + prefix)):
            return None
        relative = key[len(prefix) + 1:]
    else:
        name, relative = alias, key
    return (name, relative) if _resolves(host, relative) else None


def _resolves(module: torch.nn.Module, relative: str) -> bool:
    for part in relative.split("."):
        module = module._modules.get(part) if hasattr(module, "_modules") else None
        if module is None:
            return False
    return True
