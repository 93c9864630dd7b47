"""Beam's Kubernetes operator: Kopf handlers over the core's reconcile functions.

``main.run()`` (``beam operator``) configures Kopf and registers the handlers of
``handlers/``; each handler translates one Kopf event into a call of
``beam.core.reconcile`` and the result into ``status``. Nothing here knows the ledger's
rules: ``beam apply -f`` runs the same reconcile functions without a cluster.
"""
