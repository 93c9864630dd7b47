"""Compile proto/ into Python modules when the package is built or installed.

Generated code is derived state: it is rebuilt from the .proto files on every
install (editable or wheel) and never committed. The modules land next to the
hand-written ones (``beam.balance.v1.balance_pb2``) so the import path mirrors the
proto package, and the cross-file imports protoc writes resolve without rewriting.
"""

from __future__ import annotations

import pathlib
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class ProtoBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        root = pathlib.Path(self.root)
        generated = compile_protos(root)
        # Generated files are git-ignored, which hatch honours; list them explicitly.
        build_data.setdefault("artifacts", []).extend(
            str(path.relative_to(root)) for path in generated
        )


def compile_protos(root: pathlib.Path) -> list[pathlib.Path]:
    import grpc_tools
    from grpc_tools import protoc

    proto_root = root / "proto"
    out = root / "service"
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    sources = sorted(str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto"))
    if not sources:
        return []
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; see the messages above")
    generated: list[pathlib.Path] = []
    for source in sources:
        package_dir = out / pathlib.Path(source).parent
        # Make every directory on the way a regular package.
        for directory in [package_dir, *package_dir.parents]:
            if directory == out or out not in directory.parents:
                break
            init = directory / "__init__.py"
            if not init.exists():
                init.write_text("")
            generated.append(init)
        stem = pathlib.Path(source).stem
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            generated.append(package_dir / f"{stem}{suffix}")
    return sorted(set(generated))


if __name__ == "__main__":
    for path in compile_protos(pathlib.Path(__file__).parent):
        print(path)
