"""The deterministic execution engine.

::

    engine = Engine(cas, settings)
    result = engine.run(ExecutionRequest.parse(raw))
    report = engine.replay(result)          # report.ok, report.differences
"""

from requiem.engine.executor import Engine
from requiem.engine.models import ExecutionRequest, ExecutionResult, Policy
from requiem.engine.replay import Difference, ReplayReport

__all__ = [
    "Difference",
    "Engine",
    "ExecutionRequest",
    "ExecutionResult",
    "Policy",
    "ReplayReport",
]
