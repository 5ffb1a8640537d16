"""The experiment registry: a model experiment trains at the schedule of its own scale, never at a default one."""

import pytest

from axmini import experiments
from axmini.experiments import decoders, lm


def test_every_model_is_an_experiment_with_its_own_schedule():
    assert set(decoders.MODELS) <= set(experiments.names())
    assert set(decoders.MODELS) == set(lm._SCHEDULES)


def test_a_model_missing_from_the_schedule_table_is_refused():
    with pytest.raises(LookupError, match=r"MODELS\['llama_3b'\] has no schedule in experiments\.lm\._SCHEDULES"):
        lm._model_experiment("llama_3b")
    assert "llama_3b" not in experiments.names()
