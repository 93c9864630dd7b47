"""The ``beam`` command line (``beam``, ``beam-api``, ``beam-cli``): a composition root.

It starts the servers (``serve``, ``operator``, ``migrate``), applies manifests without a
cluster (``apply -f``) and talks to a running service over REST (``customer``, ``usage``,
...). ``beam dev`` lives in the separate ``beam_dev`` package, imported only when asked for.
"""
