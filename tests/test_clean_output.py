"""nnpatch's own calls into torch and transformers raise no deprecation warning and print nothing:
a user sees only what they asked for. (pyproject.toml also turns FutureWarning and
DeprecationWarning attributed to nnpatch's modules into errors for the whole suite.)"""
import warnings

import nnpatch


def test_sweeps_and_traces_warn_and_print_nothing(capfd):
    model = nnpatch.models.load("ioi")
    pairs = nnpatch.tasks.ioi(4, template=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nnpatch.activation_patching(model, pairs, site="resid_pre", progress=False)  # cache reused
        nnpatch.activation_patching(model, pairs, site="head_out", by="layer,head", progress=False)
        nnpatch.attribution_patching(model, pairs, site="mlp_out", progress=False)
        with model.trace(pairs.clean[0]):
            hidden = model.transformer.h[1].output.save()
    assert hidden.shape[0] == 1
    deprecations = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
                    if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert deprecations == []
    out, err = capfd.readouterr()
    assert out == "" and err == ""
