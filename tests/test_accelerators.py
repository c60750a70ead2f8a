"""One list of accelerator types and one spelling rule, used by every place that reads
``accelerator_type``: the parameter checks, the tuner, both templates and the service."""
from __future__ import annotations

import pytest

from components.common.accelerators import ACCELERATOR_TYPES, check_accelerator_type
from components.tune import settings
from components.tune.launch import check_cloud_accelerator
from pipelines.parameters import check_parameters
from pipelines.vertex import CLUSTER_TUNING_ACCELERATORS, TUNING_MACHINES, check_accelerator_type \
    as vertex_check


def test_every_machine_table_covers_exactly_the_accelerator_types():
    assert set(TUNING_MACHINES) == set(CLUSTER_TUNING_ACCELERATORS) == set(ACCELERATOR_TYPES)


@pytest.mark.parametrize("value, hint", [("gpu", " (write 'GPU')"), (" TPU", " (write 'TPU')"),
                                         ("A100", ""), ("", "")])
def test_every_reader_refuses_what_the_rule_refuses(value, hint):
    message = f"accelerator_type {value!r} is not 'GPU' or 'TPU'{hint}"
    expected = [] if value == "" else [message]  # an empty parameter is the default, GPU
    assert check_parameters("tune-large-model", {"accelerator_type": value}) == expected
    for reader in (check_accelerator_type, lambda v: settings.batch_size_for("8k", v),
                   check_cloud_accelerator, vertex_check.python_func):
        with pytest.raises(ValueError) as refused:
            reader(value)
        assert str(refused.value) == message


def test_the_accepted_types_are_read_alike():
    for value in ACCELERATOR_TYPES:
        assert check_parameters("tune-large-model", {"accelerator_type": value}) == []
        assert check_accelerator_type(value) == value
        vertex_check.python_func(value)
        check_cloud_accelerator(value)  # not a cloud machine: nothing else to check
    assert [settings.batch_size_for("8k", v) for v in ACCELERATOR_TYPES] == [8, 24]
