"""The commit room: merging a saga's stack of layers into the base.

- plan.py      the redo list, computed from the layers alone (plan_commit, compact, leave_out,
               dir_fields, summarize); no daemon, no journal: unit-tested over plain directories
- identity.py  what the base holds: base identities and conflicts (base_identity,
               same_identity), the mount points a plan would cross (mount_points), what refuses
               a plan before it is journaled (refusals), the base entries it replaces (base_idents)
- apply.py     executing a plan: metacopies given their data (materialize), then Merger.stage
               and Merger.apply, each idempotent; fault injection (fault)

Callers (the saga engine, `saga diff` without a daemon) use the names re-exported here.
Imports flow one way: apply -> identity -> plan -> osutil.
"""

from .apply import FAULT_LABELS, Merger, cleanup_stage, fault, materialize, new_token
from .identity import base_identity, base_idents, listing_digest, mount_points, refusals, same_identity
from .plan import MergeError, Refused, compact, count_entries, dir_fields, leave_out, plan_commit, summarize

__all__ = ["FAULT_LABELS", "Merger", "MergeError", "Refused", "base_identity", "base_idents", "cleanup_stage",
           "compact", "count_entries", "dir_fields", "fault", "leave_out", "listing_digest", "materialize",
           "mount_points", "new_token", "plan_commit", "refusals", "same_identity", "summarize"]
