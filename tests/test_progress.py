"""What nnpatch writes while it works: sweeps show a text progress bar (a saved notebook keeps it
as text, never as a widget it cannot redraw), and loading a bundled model shows no bar at all."""
import pytest
import tqdm.std
from transformers import AutoModelForCausalLM
from transformers.utils import logging

import nnpatch
from nnpatch.patching import api


def test_sweep_progress_is_a_text_bar_on_stderr(capfd):
    bar = api._progress(3, "patching x", True)
    assert type(bar) is tqdm.std.tqdm  # not tqdm.auto's notebook widget
    bar.close()
    capfd.readouterr()
    model, pairs = nnpatch.models.load("ioi"), nnpatch.tasks.ioi(2, template=0)
    nnpatch.activation_patching(model, pairs, site="attn_out", by="layer")
    err = capfd.readouterr().err
    assert "patching attn_out" in err and "100%" in err
    nnpatch.activation_patching(model, pairs, site="attn_out", by="layer", progress=False)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("enabled", [True, False])
def test_bundled_models_load_without_a_bar_and_keep_the_users_setting(capfd, enabled):
    was = logging.is_progress_bar_enabled()
    (logging.enable_progress_bar if enabled else logging.disable_progress_bar)()
    try:
        capfd.readouterr()
        if enabled:  # the bar the loaders silence is there in a plain load
            AutoModelForCausalLM.from_pretrained(nnpatch.models.path("ioi"))
            assert "Loading weights" in capfd.readouterr().err
        nnpatch.models.load("ioi")
        nnpatch.LanguageModel("table-max")
        assert "Loading weights" not in capfd.readouterr().err
        assert logging.is_progress_bar_enabled() is enabled
    finally:
        (logging.enable_progress_bar if was else logging.disable_progress_bar)()
