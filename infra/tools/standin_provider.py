"""A stand-in for the hashicorp/google provider that serves a schema and nothing else.

Terraform talks to it over the plugin protocol like to any provider (through the PyPI package
``tf``): ``terraform validate`` checks the configuration against the schema it serves, and
``terraform test`` with ``mock_provider "google"`` plans and applies against mocks shaped by it.
The schema is the file ``provider_schema.py`` derived from the published bindings (path in
``AIFN_PROVIDER_SCHEMA``). Creating, reading or deleting a real resource is refused: this
provider cannot reach Google Cloud and says so.

``install`` writes it into a Terraform filesystem mirror, with a launcher that runs this file
with the current Python::

    python standin_provider.py install --schema schema.json --mirror DIR --version 8.7.0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import stat
import sys
from pathlib import Path
from typing import Any

ADDRESS = ("registry.terraform.io", "hashicorp", "google")
REFUSAL = (
    "This is the offline stand-in for hashicorp/google (schema only, for validate and terraform "
    "test with mock_provider); it cannot create or read real resources. Run `terraform init` "
    "with the real provider for plan and apply."
)


def _serve(schema_path: Path) -> None:
    # Imported here: `install` runs without the tf package's dependencies.
    from tf import runner, schema, types
    from tf.gen import tfplugin_pb2 as pb
    from tf.iface import DataSource, Provider, Resource
    from tf.utils import Diagnostics

    class CtyType(types.TfType):  # type: ignore[misc]
        """Any Terraform type, given as its JSON type constraint (objects and nesting included)."""

        def __init__(self, cty: Any) -> None:
            self.cty = cty

        def encode(self, value: Any) -> Any:
            return value

        def decode(self, value: Any) -> Any:
            return value

        def tf_type(self) -> bytes:
            return json.dumps(self.cty, separators=(",", ":")).encode()

    modes = {
        "list": pb.Schema.NestedBlock.NestingMode.LIST,
        "set": pb.Schema.NestedBlock.NestingMode.SET,
        "single": pb.Schema.NestedBlock.NestingMode.SINGLE,
        "map": pb.Schema.NestedBlock.NestingMode.MAP,
    }

    class Nested(schema.NestedBlock):  # type: ignore[misc]
        """A nested block in any nesting mode (``tf`` itself only has set and single)."""

        def __init__(self, name: str, spec: dict[str, Any]) -> None:
            super().__init__(
                name,
                schema.NestMode.Set,
                _block(spec["block"]),
                spec.get("min_items"),
                spec.get("max_items"),
            )
            self.mode = spec["nesting_mode"]

        def to_pb(self) -> Any:
            return pb.Schema.NestedBlock(
                type_name=self.type_name,
                block=self.block.to_pb(),
                min_items=self.min_items,
                max_items=self.max_items,
                nesting=modes[self.mode],
            )

        def encode(self, value: Any) -> Any:
            return value

        def decode(self, value: Any) -> Any:
            return value

        def semantically_equal(self, a: Any, b: Any) -> bool:
            return bool(a == b)

    def _attributes(block: dict[str, Any]) -> list[Any]:
        return [
            schema.Attribute(
                name,
                CtyType(spec["type"]),
                required=spec.get("required", False),
                optional=spec.get("optional", False),
                computed=spec.get("computed", False),
                sensitive=spec.get("sensitive", False),
            )
            for name, spec in sorted(block.get("attributes", {}).items())
        ]

    def _block(block: dict[str, Any]) -> Any:
        return schema.Block(
            attributes=_attributes(block),
            block_types=[Nested(n, s) for n, s in sorted(block.get("block_types", {}).items())],
        )

    def _schema(spec: dict[str, Any]) -> Any:
        block = spec["block"]
        return schema.Schema(
            version=spec.get("version", 0),
            attributes=_attributes(block),
            block_types=[Nested(n, s) for n, s in sorted(block.get("block_types", {}).items())],
        )

    doc = json.loads(schema_path.read_text())
    (provider_spec,) = doc["provider_schemas"].values()

    def refuse(ctx: Any, *_: Any) -> None:
        ctx.diagnostics.add_error(f"{ctx.type_name}: not available offline", REFUSAL)

    def kind(name: str, spec: dict[str, Any], base: type) -> type:
        built = _schema(spec)
        methods: dict[str, Any] = {
            "get_name": classmethod(lambda cls: name),
            "get_schema": classmethod(lambda cls: built),
            "__init__": lambda self, provider: None,
            "read": lambda self, ctx, *_: refuse(ctx),
        }
        if base is Resource:
            methods |= {
                op: (lambda self, ctx, *_: refuse(ctx)) for op in ("create", "update", "delete")
            }
        return type(name, (base,), methods)

    resources = [kind(n, s, Resource) for n, s in sorted(provider_spec["resource_schemas"].items())]
    data_sources = [
        kind(n, s, DataSource) for n, s in sorted(provider_spec["data_source_schemas"].items())
    ]
    provider_schema = _schema(provider_spec["provider"])

    class StandIn(Provider):  # type: ignore[misc]
        def get_model_prefix(self) -> str:
            return ""  # the type names already start with google_

        def full_name(self) -> str:
            return "/".join(ADDRESS)

        def get_provider_schema(self, diags: Diagnostics) -> Any:
            return provider_schema

        def validate_config(self, diags: Diagnostics, config: dict[str, Any]) -> None:
            return None

        def configure_provider(self, diags: Diagnostics, config: dict[str, Any]) -> None:
            return None

        def get_data_sources(self) -> list[type]:
            return data_sources

        def get_resources(self) -> list[type]:
            return resources

    runner.run_provider(StandIn(), sys.argv)


def _platform() -> str:
    machine = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[
        platform.machine().lower()
    ]
    return f"{platform.system().lower()}_{machine}"


def install(schema_path: Path, mirror: Path, version: str) -> Path:
    """Write the provider into ``mirror`` (unpacked layout) and return its executable."""
    target = mirror.joinpath(*ADDRESS, version, _platform())
    target.mkdir(parents=True, exist_ok=True)
    exe = target / f"terraform-provider-google_v{version}"
    exe.write_text(
        "#!/bin/sh\n"
        "# Offline stand-in for hashicorp/google: serves the schema derived from the bindings.\n"
        f"export AIFN_PROVIDER_SCHEMA={shlex.quote(str(schema_path.resolve()))}\n"
        f"exec {shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).resolve()))}"
        ' serve "$@"\n'
    )
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return exe


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["serve"]:
        _serve(Path(os.environ["AIFN_PROVIDER_SCHEMA"]))
        return 0
    parser = argparse.ArgumentParser(description="Install the offline google provider stand-in.")
    parser.add_argument("command", choices=["install"])
    parser.add_argument("--schema", type=Path, required=True)
    parser.add_argument("--mirror", type=Path, required=True)
    parser.add_argument("--version", required=True)
    ns = parser.parse_args(args)
    print(f"stand-in provider: {install(ns.schema, ns.mirror, ns.version)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
