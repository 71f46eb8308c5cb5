"""Fault injection for crash tests: DELTATUNE_FAULT="<action>@<point>:<step>".

Points are `after_step` (an optimizer step finished and was logged), `in_save` (checkpoint
files written into the temporary folder, manifest not yet) and `after_save` (the checkpoint is in
place; at the last step, the final adapter is not yet). Actions: `kill` (SIGKILL, nothing
runs after it) and `term` (SIGTERM, the loop's handler saves and stops). Unset: no effect.
"""

from __future__ import annotations

import os
import signal


def maybe_fault(point: str, step: int) -> None:
    spec = os.environ.get("DELTATUNE_FAULT")
    if not spec:
        return
    action, _, where = spec.partition("@")
    name, _, at = where.partition(":")
    if name != point or not at.isdigit() or int(at) != step:
        return
    os.kill(os.getpid(), signal.SIGKILL if action == "kill" else signal.SIGTERM)
