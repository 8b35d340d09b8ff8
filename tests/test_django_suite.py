"""Django's own test apps give the same results through dbha as without a
router, on a real PostgreSQL primary + streaming standby
(tools/django_suite.py)."""

from __future__ import annotations

import pytest
from django_suite import APPS, MODES, SuiteRun, apps_for, differences, run_suite, summary


@pytest.fixture(scope="module")
def baseline() -> SuiteRun:
    """All the apps without a router: once, for every mode to compare with."""
    run = run_suite(None)
    assert run.exit_code is not None, f"the baseline was killed at its timeout: {run.log_file}"
    # The suite really ran here: every app has passing tests.
    assert all(run.counts()[app]["passed"] for app in APPS), summary([run])
    return run


@pytest.mark.parametrize("reads", MODES)
def test_the_suite_gives_the_same_results_through_dbha(baseline: SuiteRun, reads: str) -> None:
    run = run_suite(reads, apps_for(reads))
    report = summary([baseline, run])
    # dbha watched the servers, and at the end knew them for what they are.
    assert run.dbha_nodes == [
        {"alias": "default", "role": "primary", "state": "up", "writer": True},
        {"alias": "failover1", "role": "standby", "state": "up", "writer": False},
    ], report
    found = differences(baseline, run)
    assert not found, report + "\n" + "\n".join(found)
