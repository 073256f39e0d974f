"""docs/tracing_surface.md: every Python example runs as written, and its values are checked
against plain PyTorch on the bundled model."""
import contextlib
import io
import re
from pathlib import Path

import torch

from nnpatch.engine import compile_source

PAGE = Path(__file__).resolve().parent.parent / "docs" / "tracing_surface.md"


def test_the_examples_run_and_compute_what_they_say():
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(blocks) == 9
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for i, block in enumerate(blocks):
            exec(compile_source(block, f"<tracing_surface.md:{i}>"), namespace)
    model, prompt = namespace["model"], namespace["prompt"]
    hf = model.module
    ids = model.tokenizer(prompt, return_tensors="pt")["input_ids"]
    seen = {}
    handles = [hf.transformer.h[2].register_forward_hook(lambda m, a, o: seen.__setitem__(2, o.clone())),
               hf.transformer.h[0].register_forward_hook(lambda m, a, o: seen.__setitem__(0, o.clone()))]
    with torch.no_grad():
        logits = hf(ids).logits
    for h in handles:
        h.remove()
    assert torch.allclose(namespace["hidden"], seen[2], atol=1e-6)
    assert torch.allclose(namespace["early"], seen[0], atol=1e-6)
    lines = out.getvalue().splitlines()
    assert lines[0] == " Mary 2"  # the patched answer, and the session's two traces
    assert namespace["shape"] == (1, ids.shape[1], 128) and lines[1] == f"torch.Size([1, {ids.shape[1]}, 128])"
    skip_hook = hf.transformer.h[1].register_forward_hook(lambda m, a, o: a[0])
    with torch.no_grad():
        skipped = hf(ids).logits[:, -1]
    skip_hook.remove()
    assert torch.allclose(namespace["skipped"], skipped, atol=1e-5)
    assert torch.allclose(namespace["plain_logits"], logits, atol=1e-5)
    assert namespace["weights"].shape == (1, 4, ids.shape[1], ids.shape[1])
    assert "attention_interface_1" in out.getvalue()
