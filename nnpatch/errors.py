"""The one base class of every error nnpatch raises on purpose."""


class NNPatchError(Exception):
    """A misuse of nnpatch; the message says what was wrong and how to fix it."""
