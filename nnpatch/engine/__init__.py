"""The intervention engine: wrap a model, trace it, read and edit module values, take gradients.

Nothing here knows about patching sweeps, plots or notebooks. Reading order: `model` (the
wrapper and the envoy tree of `envoy`), `tracing` (the with-block), `source` (how its body is
compiled), `invoke` and `forward` (invokes as greenlets meeting one batched forward pass),
`gradients`, and the helpers `batching`, `inputs`, `hooks` and `tracebacks`.
"""
from .envoy import Envoy
from .model import LanguageModel, Model
from .source import compile_source
from .tracing import Tracer

__all__ = ["Model", "LanguageModel", "Envoy", "Tracer", "compile_source"]
