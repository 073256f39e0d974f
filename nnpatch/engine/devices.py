"""Where a model runs: the device its inputs go to, and whether its weights can run at all.

A model may sit on one device, or be placed by accelerate / transformers over several
(`device_map=...`, `offload_folder=...`, `cpu_offload`, `disk_offload`). Offloaded weights stay on
PyTorch's "meta" device and accelerate loads them into each module as it runs. Every caller that
needs a device (traces, sweeps, magics, the workbench) asks `input_device`; values written into a
module are moved to that module's own value's device where they are written (`engine.forward`,
`patching.runner`), and results are returned on the CPU.

    >>> import nnpatch
    >>> from nnpatch.engine.devices import input_device
    >>> input_device(nnpatch.models.load("ioi").module).type
    'cpu'
"""
from __future__ import annotations

import weakref

import torch

from ..errors import NNPatchValueError


def input_device(module: torch.nn.Module) -> torch.device:
    """Where a model wants its inputs: where its input embedding runs, else its first parameter's
    device (so a model moved to CUDA takes prompts tokenized on the CPU). A model placed by
    accelerate keeps offloaded weights on the meta device; its embedding then runs where
    accelerate's hook says."""
    embedding = input_embedding(module)
    for m in (embedding, module):
        # accelerate keeps its hook in the module's __dict__ (a plain getattr of a missing
        # attribute costs an AttributeError inside nn.Module.__getattr__, on every trace)
        device = getattr(vars(m).get("_hf_hook") if m is not None else None, "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    weight = getattr(embedding, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


_EMBEDDING_AT: "weakref.WeakKeyDictionary[torch.nn.Module, str | None]" = weakref.WeakKeyDictionary()
_UNSEEN = object()


def embedding_path(module: torch.nn.Module) -> str | None:
    """The `named_modules()` path of the model's input embedding (`get_input_embeddings()`), or
    None when it has none in its module tree.

    Found once per model: Hugging Face's `get_input_embeddings` takes several microseconds per
    call, and a trace needs the embedding once per forward pass. A replaced embedding
    (`set_input_embeddings`, `resize_token_embeddings`) sits at the same path."""
    path = _EMBEDDING_AT.get(module, _UNSEEN)
    if path is _UNSEEN:
        embedding = _ask_embedding(module)
        path = _EMBEDDING_AT[module] = None if embedding is None else next(
            (name for name, m in module.named_modules() if m is embedding), None)
    return path


def input_embedding(module: torch.nn.Module) -> torch.nn.Module | None:
    """The model's input embedding, or None when it has none: the module at `embedding_path`
    (followed as `hooks.resolve` does, without its error: this runs once per forward pass),
    else whatever `get_input_embeddings()` returns."""
    path = embedding_path(module)
    if path is not None:
        found = module
        for name in filter(None, path.split(".")):
            found = found._modules.get(name)
            if found is None:
                break
        else:
            return found
    return _ask_embedding(module)


def _ask_embedding(module: torch.nn.Module) -> torch.nn.Module | None:
    try:
        return module.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def check_placement(module: torch.nn.Module) -> None:
    """Raise `placement_error(module)` if there is one. Sweeps call it before they start; traces
    call `placement_error` only when the forward pass fails, so a trace pays nothing for it."""
    error = placement_error(module)
    if error is not None:
        raise error


def placement_error(module: torch.nn.Module) -> NNPatchValueError | None:
    """An error naming the first module whose weights are on the meta device with nothing to load
    them when it runs (a device map that left it out, or a model built under init_empty_weights
    and never loaded), or None. Weights that accelerate offloads (to the CPU or to disk) are fine.
    One pass over the parameters when no weight is on meta."""
    if not any(p.is_meta for p in module.parameters()):
        return None
    for path, m, loaded in _walk(module, "", False):
        stranded = [name for name, p in m.named_parameters(recurse=False) if p.is_meta]
        if stranded and not loaded:
            shapes = ", ".join(f"{name} {tuple(m.get_parameter(name).shape)}" for name in stranded[:3])
            return NNPatchValueError(
                f"module {path or '(the root module)'} ({type(m).__name__}) has weights on the 'meta' "
                f"device ({shapes}) and no offload hook loads them, so it cannot run. Place it on a "
                "real device: give it a device in device_map (\"cpu\", \"disk\" with "
                "offload_folder=..., or a GPU index), or load its weights; device_map=\"auto\" with "
                "offload_folder=... places every module")
    return None


def _walk(module: torch.nn.Module, path: str, loaded: bool):
    """(path, module, whether an accelerate hook on it or above it loads offloaded weights)."""
    loaded = loaded or _offloads(getattr(module, "_hf_hook", None))
    yield path, module, loaded
    for name, child in module.named_children():
        yield from _walk(child, f"{path}.{name}" if path else name, loaded)


def _offloads(hook) -> bool:
    if hook is None:
        return False
    if getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None:
        return True
    return any(_offloads(h) for h in getattr(hook, "hooks", ()))  # a SequentialHook
