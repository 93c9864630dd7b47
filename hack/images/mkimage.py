"""Writes an OCI image archive (oci-archive) from uncompressed layer tars, with no image tool.

    python3 hack/images/mkimage.py --name localhost/pause:1 --layer pause.tar \
        --entrypoint /pause --output pause.oci.tar

Why it exists: the test cluster's images come from Debian packages only (no registry), and
the two images that are not built from a Dockerfile (the pod sandbox's pause image and the
Debian base every Dockerfile starts FROM) need only their layers wrapped in OCI metadata.
`ctr images import` names the image from the `io.containerd.image.name` annotation and
`buildah pull oci-archive:` from `org.opencontainers.image.ref.name`; both are set.

Layers stay uncompressed (no gzip pass over a 200 MB rootfs) and every timestamp in the archive
is 0, so the same layers and options always give the same digests.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile
from pathlib import Path

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
CHUNK_BYTES = 1 << 20


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK_BYTES):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def descriptor(media_type: str, digest: str, size: int) -> dict[str, object]:
    return {"mediaType": media_type, "digest": digest, "size": size}


def add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    archive.addfile(info, io.BytesIO(data))


def add_blob(archive: tarfile.TarFile, digest: str, data: bytes) -> None:
    add_bytes(archive, "blobs/sha256/" + digest.removeprefix("sha256:"), data)


def image_config(args: argparse.Namespace, diff_ids: list[str]) -> dict[str, object]:
    config: dict[str, object] = {
        "Env": args.env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    }
    if args.entrypoint:
        config["Entrypoint"] = args.entrypoint
    if args.cmd:
        config["Cmd"] = args.cmd
    if args.user:
        config["User"] = args.user
    if args.workdir:
        config["WorkingDir"] = args.workdir
    return {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "hack/images/mkimage.py"}],
    }


def write_archive(args: argparse.Namespace) -> str:
    layers = [Path(layer) for layer in args.layer]
    layer_digests = [file_digest(layer) for layer in layers]
    config_bytes = json.dumps(image_config(args, layer_digests), sort_keys=True).encode()
    config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": descriptor(MEDIA_CONFIG, config_digest, len(config_bytes)),
        "layers": [
            descriptor(MEDIA_LAYER, digest, layer.stat().st_size)
            for layer, digest in zip(layers, layer_digests, strict=True)
        ],
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    manifest_digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                **descriptor(MEDIA_MANIFEST, manifest_digest, len(manifest_bytes)),
                "annotations": {
                    "io.containerd.image.name": args.name,
                    "org.opencontainers.image.ref.name": args.name,
                },
            }
        ],
    }
    output = Path(args.output)
    partial = output.with_name(output.name + ".partial")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as archive:
        add_bytes(archive, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        for layer, digest in zip(layers, layer_digests, strict=True):
            info = tarfile.TarInfo("blobs/sha256/" + digest.removeprefix("sha256:"))
            info.size = layer.stat().st_size
            info.mode = 0o644
            with layer.open("rb") as stream:
                archive.addfile(info, stream)
        add_blob(archive, config_digest, config_bytes)
        add_blob(archive, manifest_digest, manifest_bytes)
        add_bytes(archive, "index.json", json.dumps(index, sort_keys=True).encode())
    partial.replace(output)
    return manifest_digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="image name, e.g. localhost/pause:1")
    parser.add_argument("--layer", action="append", required=True, help="uncompressed tar")
    parser.add_argument("--entrypoint", nargs="*", default=None)
    parser.add_argument("--cmd", nargs="*", default=None)
    parser.add_argument("--env", action="append", default=None, help="KEY=VALUE")
    parser.add_argument("--user", default="")
    parser.add_argument("--workdir", default="")
    parser.add_argument("--output", required=True, help="the oci-archive to write")
    args = parser.parse_args()
    print(f"{args.name} {write_archive(args)}")


if __name__ == "__main__":
    main()
