"""Sweeps on every supported architecture against a one-forward-per-cell loop.

The fast path (blocks swapped for pass-throughs, runs started mid-prompt from the key/value
cache, last block trimmed) depends on each architecture's forward; this checks it for all of them.
"""
import pytest
import torch

import nnpatch
from test_sites import SEQUENTIAL, PARALLEL, build

pytestmark = pytest.mark.usefixtures("one_thread")

CLEAN = [[3, 4, 5, 6, 7, 8], [9, 4, 10, 11, 7, 12]]
CORRUPT = [[3, 4, 13, 6, 7, 8], [9, 4, 14, 11, 15, 12]]
ANSWER, WRONG = [20, 21], [22, 23]


def naive(model, site_name, by, direction):
    """Raw logit differences of each cell: one plain forward per cell and pair."""
    table = nnpatch.sites(model)
    base, source = (CORRUPT, CLEAN) if direction == "denoise" else (CLEAN, CORRUPT)

    def forward(ids, site=None, edit=None):
        store, handle = {}, None
        if site is not None:
            module = model.get_submodule(site.path)
            if site.kind == "input":
                def pre(m, args):
                    store["v"] = args[0]
                    return None if edit is None else (edit(args[0]),) + args[1:]
                handle = module.register_forward_pre_hook(pre)
            else:
                def post(m, args, out):
                    v = out[0] if isinstance(out, tuple) else out
                    store["v"] = v
                    if edit is not None:
                        return (edit(v),) + out[1:] if isinstance(out, tuple) else edit(v)
                handle = module.register_forward_hook(post)
        try:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        finally:
            if handle is not None:
                handle.remove()
        return logits, store.get("v")

    n_heads = table.n_heads
    shape = {"layer": table.n_layers, "head": n_heads, "pos": len(CLEAN[0])}
    out = torch.zeros([shape[d] for d in by])
    for index in torch.cartesian_prod(*[torch.arange(shape[d]) for d in by]).reshape(-1, len(by)).tolist():
        cell = dict(zip(by, index))
        site = table[site_name][cell["layer"]]
        total = 0.0
        for i in range(2):
            src = forward(source[i], site)[1]

            def edit(v, src=src):
                v = v.clone()
                pos = cell.get("pos", slice(None))
                if "head" in cell:
                    v.view(*v.shape[:-1], n_heads, -1)[:, pos, cell["head"]] = \
                        src.view(*src.shape[:-1], n_heads, -1)[:, pos, cell["head"]]
                else:
                    v[:, pos] = src[:, pos]
                return v
            logits = forward(base[i], site, edit)[0]
            total += float(logits[ANSWER[i]] - logits[WRONG[i]])
        out[tuple(index)] = total / 2
    return out


@pytest.mark.parametrize("name", SEQUENTIAL + PARALLEL + ["bert"])
def test_every_architecture_matches_the_loop(name):
    model = build(name)
    for site, by, direction in [("resid_pre", ("layer", "pos"), "denoise"), ("mlp_out", ("layer", "pos"), "noise"),
                                ("head_out", ("layer", "head"), "denoise")]:
        got = nnpatch.activation_patching(model, CLEAN, CORRUPT, answer=ANSWER, wrong=WRONG, site=site, by=by,
                                          direction=direction, metric="logit_diff_raw", batch_size=7,
                                          progress=False)
        want = naive(model, site, by, direction)
        err = (got.values - want).abs().max().item()
        assert err < 1e-4 * max(1.0, want.abs().max().item()), f"{site} {by} {direction}: max error {err}"
