"""The Go service's workflow context in workload_data: workflow_priority and workflow_dependencies."""

from __future__ import annotations

import pytest

from coordinator.errors import InvalidRequest
from coordinator.workload import WORKLOAD_TYPES, analyze_workload


@pytest.mark.parametrize("workload_type", WORKLOAD_TYPES)
def test_workflow_priority_is_the_priority_for_every_type(workload_type: str) -> None:
    estimate = analyze_workload(workload_type, {"workflow_priority": 9})
    assert estimate.priority == 9
    assert "workflow_priority 9: priority 9" in estimate.estimate["rules"]


def test_workflow_priority_wins_over_model_name_rules() -> None:
    # The 7B rule sets priority 8; the workflow's stated priority comes after it.
    assert analyze_workload("inference", {"model_name": "gemma-7b"}).priority == 8
    assert analyze_workload("inference", {"model_name": "gemma-7b", "workflow_priority": 3}).priority == 3


def test_without_workflow_priority_the_table_decides() -> None:
    assert analyze_workload("inference", {}).priority == 7
    assert analyze_workload("training", {}).priority == 5


@pytest.mark.parametrize("bad", [0, 11, 5.5, "high", True])
def test_workflow_priority_out_of_range_is_refused(bad: object) -> None:
    with pytest.raises(InvalidRequest, match="workflow_priority must be an integer from 1 to 10"):
        analyze_workload("generic", {"workflow_priority": bad})


def test_workflow_dependencies_are_recorded_not_enforced() -> None:
    estimate = analyze_workload("training", {"workflow_dependencies": ["wf-1", "wf-2"]})
    assert estimate.estimate["workflow_dependencies"] == ["wf-1", "wf-2"]
    assert any("not enforced" in rule for rule in estimate.estimate["rules"])


@pytest.mark.parametrize("bad", ["wf-1", [1, 2], {"a": "b"}])
def test_workflow_dependencies_must_be_names(bad: object) -> None:
    with pytest.raises(InvalidRequest, match="workflow_dependencies must be an array of strings"):
        analyze_workload("training", {"workflow_dependencies": bad})
