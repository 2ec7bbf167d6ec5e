"""Shared pytest wiring.

Contract: tests marked ``privileged`` (root, BPF, network namespaces) skip on
an unprivileged developer machine, but when ``CTXDP_REQUIRE_PRIVILEGED=1``
(set by ``.ci/run``) any skip of such a test is reported as a failure, so a
broken BPF or netns setup can never look green.
"""

from __future__ import annotations

import os

import pytest

REQUIRE_PRIVILEGED = os.environ.get("CTXDP_REQUIRE_PRIVILEGED") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    # An expected failure (xfail) is reported as "skipped" with ``wasxfail``;
    # it is not a privileged skip and must stay an xfail.
    if (REQUIRE_PRIVILEGED and report.skipped and not hasattr(report, "wasxfail")
            and item.get_closest_marker("privileged")):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (
            f"privileged test skipped but CTXDP_REQUIRE_PRIVILEGED=1: {reason}"
        )
