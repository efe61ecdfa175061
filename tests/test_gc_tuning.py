"""`nerbatch.gc_tuning`: the collector through start-up, the annotate job and model loading."""

from __future__ import annotations

import shutil

import pytest

from nerbatch.modeling import ModelError, load_token_classifier


@pytest.mark.slow
def test_loading_pauses_the_collector_and_restores_it(tiny_model_dir, tmp_path, monkeypatch):
    """The collector is off while the model is built (start-up time), and comes back on
    afterwards, also when loading fails; the console script is `run` (see `nerbatch.gc_tuning`)."""
    import gc
    from importlib.metadata import entry_points

    import nerbatch.encoder
    import nerbatch.modeling

    during = []

    def spy(module, name):
        real = getattr(module, name)

        def loading(*args):
            during.append(gc.isenabled())
            return real(*args)

        monkeypatch.setattr(module, name, loading)

    spy(nerbatch.encoder, "load_classifier")  # the plain-torch BERT path
    spy(nerbatch.modeling, "_load_weights")  # transformers' path
    assert gc.isenabled()
    load_token_classifier(str(tiny_model_dir))
    assert during == [False] and gc.isenabled()
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    with pytest.raises(ModelError, match="could not load its weights"):
        load_token_classifier(str(no_weights))
    assert during == [False, False] and gc.isenabled()
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "nerbatch"]
    assert script.value == "nerbatch.cli:run"


def test_the_console_start_up_ends_with_the_first_model_load(tiny_model_dir):
    """`nerbatch.cli.run` starts with full collections held back (young ones go on); loading the
    model freezes everything built so far (never walked again) and restores the thresholds. Without
    `begin`, loading changes neither."""
    import gc

    from nerbatch import gc_tuning

    thresholds, frozen = gc.get_threshold(), gc.get_freeze_count()
    load_token_classifier(str(tiny_model_dir))
    assert gc.get_threshold() == thresholds and gc.get_freeze_count() == frozen
    gc_tuning.begin()
    try:
        assert gc.isenabled() and gc.get_threshold()[:2] == thresholds[:2]
        assert gc.get_threshold()[2] > 1_000_000
        load_token_classifier(str(tiny_model_dir))
        assert gc.isenabled() and gc.get_threshold() == thresholds
        assert gc.get_freeze_count() > frozen
    finally:
        gc_tuning._thresholds, gc_tuning._owned = None, False  # a failed load must not leave later tests "begun"
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def test_the_console_job_collects_once_per_chunk(monkeypatch):
    """In nerbatch's console command the annotate job turns automatic collections off and collects
    after each chunk: young generations each time, everything every FULL_EVERY chunks; the collector
    is back on afterwards, also after an error. As a library it leaves the collector alone."""
    import gc

    from nerbatch import gc_tuning

    generations = []

    def record(phase, info):
        if phase == "start":
            generations.append(info["generation"])

    gc.callbacks.append(record)
    try:
        with gc_tuning.collections_per_chunk():
            assert gc.isenabled()
            gc_tuning.after_chunk()
        assert generations == []
        monkeypatch.setattr(gc_tuning, "_owned", True)
        with pytest.raises(RuntimeError), gc_tuning.collections_per_chunk():
            assert not gc.isenabled()
            generations.clear()
            for _ in range(gc_tuning.FULL_EVERY):
                gc_tuning.after_chunk()
            raise RuntimeError("a unit failed")
        gc_tuning.after_chunk()  # outside the job: nothing
    finally:
        gc.callbacks.remove(record)
    assert gc.isenabled()
    assert generations == [1] * (gc_tuning.FULL_EVERY - 1) + [2]
