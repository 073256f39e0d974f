"""Placeholder replaced by the engine."""
class Envoy:
    def __init__(self, module, path, root):
        object.__setattr__(self, "_module", module)
