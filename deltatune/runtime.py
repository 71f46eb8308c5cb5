"""CPU threads and OpenMP waiting for runs on machines that do other work too.

PyTorch runs CPU kernels on an OpenMP pool, and OpenMP's default lets idle pool threads spin
(busy-wait) for a while before sleeping. On idle cores that costs nothing visible; on cores shared
with other programs the spinning threads take the time slices the working thread needs, so a step
that takes 2 s alone took 13-19 s next to one competing process (6-7x the CPU time, hundreds of
thousands of involuntary context switches). Waiting passively (sleeping at once) lets the run slow
down only by the share of the cores it gets.

The policy, applied by `deltatune` commands at start and printed on one line:
- `OMP_WAIT_POLICY=PASSIVE` unless the user set it. OpenMP reads it once, when its library loads
  (when torch is imported), so `prefer_passive_waiting()` runs at the top of `deltatune/__init__.py`
  and only sets it if torch is not imported yet and the variable is unset.
- threads: `--threads N` if given, else `OMP_NUM_THREADS` if set, else the cores this process may
  run on (`os.sched_getaffinity`, lowered by a cgroup CPU quota), set with `torch.set_num_threads`.
  Without `--threads` the count is never raised above what torch has now, so a program that calls
  `deltatune.cli.main.main(...)` after lowering it keeps its choice.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def prefer_passive_waiting() -> None:
    """Set OMP_WAIT_POLICY=PASSIVE if the user has not chosen and OpenMP is not loaded yet."""
    if "OMP_WAIT_POLICY" not in os.environ and "torch" not in sys.modules:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.environ["_DELTATUNE_SET_OMP_WAIT_POLICY"] = "1"  # so the start line can say who chose it


def available_cores(cpu_max: Path = _CGROUP_CPU_MAX) -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota if one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


@dataclass(frozen=True)
class ThreadPlan:
    threads: int
    """Threads for torch's CPU kernels."""
    source: str
    """Where the count came from: '--threads', 'OMP_NUM_THREADS' or 'cores available'."""
    wait_policy: str
    """OMP_WAIT_POLICY as the OpenMP runtime saw it ('default' when unset)."""
    wait_source: str
    """'deltatune default', 'environment', or 'unset'."""

    def describe(self) -> str:
        return (
            f"threads: {self.threads} ({self.source}; --threads N to change), "
            f"OpenMP wait policy: {self.wait_policy} ({self.wait_source})"
        )


def plan_threads(
    requested: int | None = None, *, current: int, environ: dict[str, str] | None = None, cores: int | None = None
) -> ThreadPlan:
    """The thread count and wait policy a command will use (pure: reads, changes nothing).

    Args:
        requested: `--threads N`, or None.
        current: torch's thread count now. Without --threads it is never raised (an in-process caller
            may have lowered it on purpose), only capped at the cores available.
        environ: the environment (default os.environ).
        cores: the cores available (default `available_cores()`).
    """
    env = os.environ if environ is None else environ
    cores = available_cores() if cores is None else cores
    if requested is not None:
        if requested < 1:
            from deltatune.core.config import ConfigError

            raise ConfigError(f"--threads must be >= 1, got {requested}")
        threads, source = requested, "--threads"
    elif env.get("OMP_NUM_THREADS", "").strip().isdigit() and int(env["OMP_NUM_THREADS"]) >= 1:
        threads, source = current, "OMP_NUM_THREADS"
    elif current >= cores:
        threads, source = cores, "cores available"
    else:
        threads, source = current, "set in this process"
    policy = env.get("OMP_WAIT_POLICY")
    if policy is None:
        wait_policy, wait_source = "default", "unset"
    else:
        wait_policy = policy.upper()
        wait_source = "deltatune default" if env.get("_DELTATUNE_SET_OMP_WAIT_POLICY") == "1" else "environment"
    return ThreadPlan(threads=threads, source=source, wait_policy=wait_policy, wait_source=wait_source)


def apply_thread_policy(requested: int | None = None, *, announce: bool = True) -> ThreadPlan:
    """Apply the plan to torch and print it.

    Args:
        requested: `--threads N`, or None for the default.
        announce: print the chosen values on one line (stdout, with the command's other progress lines;
            stderr stays for the one-line error).
    """
    import torch

    plan = plan_threads(requested, current=torch.get_num_threads())
    if torch.get_num_threads() != plan.threads:
        torch.set_num_threads(plan.threads)
    if announce:
        print(plan.describe(), flush=True)
    return plan
