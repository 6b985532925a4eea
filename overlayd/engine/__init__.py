"""The saga engine: steps as layers, compensation, crash-safe commits with conflict detection.

- core: the state machine (SagaEngine: begin, step, rollback, abort, retry, recovery after mount)
- commit: the engine's side of a commit (conflicts, plan, intent; overlayd.commit.run runs it)
- compensation: compensation commands (gate, attempts, orphans of a dead daemon)
- budgets: budgets and their meters, and the cut of a step over budget
- tracker: the paths a step changed and their base identities
- audit: the audit trail (op events, batched)
- queries: read-only operations (status, diff, log, list) and annotate
- gc: garbage collection of ended sagas
- export: saga.export, what 'saga export --git' reads (changes per step, fds of their files)
- records: trio-free reads of the journal (status_of) and request argument checks
- lock: the one lock of stack operations
- errors: EngineError, the engine's domain error (the daemon's wire maps it to a reply)

The engine never imports the daemon: the daemon passes it the workspace, the stack lock and
(through ``run``) a nursery, and maps its errors to wire codes (overlayd.daemon.wire).
"""
