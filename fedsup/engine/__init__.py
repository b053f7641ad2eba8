"""The process engine: one supervised process per task, and everything needed to run it.

Holds the task states and their transitions, the ``Task`` base class, the messages between supervisor and
child, the records, the child's worker loop, the fork servers and their launcher, the runtime (the one
``connection.wait``), the task handle, the device inventory and memory ledger, the scheduler, the public
``Supervisor``, the run directory, fault injection, and the errors and units every layer shares.

May import: the standard library and third-party packages only. Nothing in ``fedsup.federated``,
``fedsup.cluster`` or ``fedsup.ui``, and not the top-level compatibility modules: the engine knows nothing of
rounds, clusters or terminals.
"""
