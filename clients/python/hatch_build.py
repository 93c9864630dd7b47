"""Compile Beam's balance.proto into ``beam_client._generated`` when the client is built.

Generated code is derived state, rebuilt on every install (editable or wheel) and never
committed. Only message classes are generated (``--python_out`` and ``--pyi_out``): the
client calls the four methods by name, so it needs no ``_pb2_grpc`` module.

The descriptor keeps its canonical file name (``beam/balance/v1/balance.proto``), so in a
process that also imports the main project's ``beam.balance.v1.balance_pb2`` (the test
suite does) protobuf sees the same file twice and shares one set of classes instead of
refusing a duplicate symbol.

The .proto is looked up in ``proto/`` next to this file (an sdist carries it there), then
in the repository's ``proto/`` two directories up (a checkout).
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile
from typing import Any

PROTO = pathlib.PurePosixPath("beam/balance/v1/balance.proto")
PACKAGE = pathlib.PurePosixPath("src/beam_client/_generated")


def find_proto_root(root: pathlib.Path) -> pathlib.Path:
    for candidate in (root / "proto", root.parent.parent / "proto"):
        if (candidate / PROTO).is_file():
            return candidate
    raise FileNotFoundError(f"{PROTO} not found under {root}/proto or {root.parent.parent}/proto")


def compile_protos(root: pathlib.Path) -> list[pathlib.Path]:
    """Write ``src/beam_client/_generated/{__init__.py,balance_pb2.py,balance_pb2.pyi}``."""
    import grpc_tools
    from grpc_tools import protoc

    proto_root = find_proto_root(root)
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    target = root / PACKAGE
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        args = [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{include}",
            f"--python_out={scratch}",
            f"--pyi_out={scratch}",
            str(PROTO),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed; see the messages above")
        out = pathlib.Path(scratch) / PROTO.parent
        for suffix in (".py", ".pyi"):
            shutil.copyfile(out / f"{PROTO.stem}_pb2{suffix}", target / f"balance_pb2{suffix}")
    init = target / "__init__.py"
    init.write_text('"""Generated from proto/beam/balance/v1/balance.proto at build time."""\n')
    return [init, target / "balance_pb2.py", target / "balance_pb2.pyi"]


try:
    from hatchling.builders.hooks.plugin.interface import BuildHookInterface
except ImportError:  # run as a script (`python hatch_build.py`) without hatchling
    pass
else:

    class ProtoBuildHook(BuildHookInterface):  # type: ignore[type-arg]
        PLUGIN_NAME = "custom"

        def initialize(self, version: str, build_data: dict[str, Any]) -> None:
            root = pathlib.Path(self.root)
            if self.target_name == "sdist":
                return  # the sdist ships the .proto, not its output
            generated = compile_protos(root)
            # The generated files are git-ignored, which hatch honours; list them explicitly.
            build_data.setdefault("artifacts", []).extend(
                str(path.relative_to(root)) for path in generated
            )


if __name__ == "__main__":
    for path in compile_protos(pathlib.Path(__file__).parent):
        print(path)
