"""Beam: real-time enforcement of AI spending limits."""
