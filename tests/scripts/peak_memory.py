"""Run by tests/test_distributed.py: ``python peak_memory.py FOLDER OVERRIDE...`` trains one run and prints how far
its peak resident memory rose above the process's memory just before it (bytes), once everything is imported."""

import resource
import sys

import sparse_elbo
import sparse_elbo.runner  # noqa: F401  (imported before the baseline: its modules are not the run's memory)


def resident() -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS")).split()[1]) * 1024


before = resident()
sparse_elbo.run(sparse_elbo.compose(sys.argv[2:]), sys.argv[1], progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
