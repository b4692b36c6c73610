"""Derive the hashicorp/google provider schema from the published CDK-for-Terraform bindings.

The google provider binary cannot be downloaded on the machines this project is checked on, and
``terraform validate`` / ``terraform test`` need its schema. The PyPI package
``cdktn-provider-google`` is generated from that provider's real schema (21.1.0 from
hashicorp/google 8.7.0) and ships the generated JavaScript inside its jsii tarball. Every
generated class states, for each field, what the schema said::

    // template - computed: false, optional: false, required: true
    _template = new CloudRunV2ServiceTemplateOutputReference(this, "template");

and each struct's ``...ToHclTerraform`` function (the resource's ``synthesizeHclAttributes``)
says which fields are blocks and how they nest (``type: "list" | "set" | "struct"``). This module
reads exactly that, for the resource and data-source types a configuration uses, and writes the
result in the format of ``terraform providers schema -json``. Nothing is written by hand: a
pattern it does not recognise is an error, never a guess.

What the bindings do not carry, and so this schema does not either: ``sensitive`` flags,
deprecation, schema versions, and maximum item counts other than 1 (a block is either "at most
one" or unbounded here). Value validation (enums, formats, ranges) lives in the provider's Go code
and is only checked by the real provider.

Usage::

    python provider_schema.py --wheel cdktn_provider_google-21.1.0-py3-none-any.whl \
        --config infra/terraform --out schema.json
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROVIDER_ADDRESS = "registry.terraform.io/hashicorp/google"

# cdktn calls a nested "single" object a "struct"; lists and sets keep their names.
_NESTING = {"list": "list", "set": "set", "struct": "single"}

_CLASS_RE = re.compile(r"^class (\w+) extends ([\w.]+) \{$", re.M)
_FUNC_RE = re.compile(r"^function (\w+)\(struct\) \{$", re.M)
_MEMBER_RE = re.compile(
    r"^    // (\w+) - computed: (true|false), optional: (true|false), required: (true|false)$", re.M
)
_TF_TYPE_RE = re.compile(r'^    static tfResourceType = "([\w-]+)";$', re.M)
_HCL_ENTRY_RE = re.compile(
    r'^\s+"?(\w+)"?: \{\n\s+value: ([^\n]*),\n\s+isBlock: (true|false),\n'
    r'\s+type: "(\w+)",\n\s+storageClassType: "(\w+)",\n\s+\},?$',
    re.M,
)
# A nested object (block or computed attribute): `_x = new FooList(this, "x", false);` or
# `_x = new FooOutputReference(this, "x");`.
_NESTED_RE = re.compile(r'^    _\w+ = new (\w+)\(this, "(\w+)"(?:, (true|false))?\);$', re.M)
# A computed map: `_x = new cdktn.StringMap(this, "x");`.
_MAP_RE = re.compile(r'^    _\w+ = new cdktn\.(\w+)Map\(this, "(\w+)"\);$', re.M)
# A primitive getter: `return this.getStringAttribute('x');`; a set is wrapped in `cdktn.Fn.tolist`.
_GETTER_RE = re.compile(r"return (cdktn\.Fn\.tolist\()?this\.get(\w*?)Attribute\('(\w+)'\)\)?;")
_LIST_GET_RE = re.compile(r"^    get\(index\) \{\n        return new (\w+)\(", re.M)

_GETTER_TYPES: dict[str, Any] = {
    "String": "string",
    "Number": "number",
    "Boolean": "bool",
    "List": ["list", "string"],
    "NumberList": ["list", "number"],
    "StringMap": ["map", "string"],
    "NumberMap": ["map", "number"],
    "BooleanMap": ["map", "bool"],
}
_MAP_TYPES = {"String": ["map", "string"], "Number": ["map", "number"], "Boolean": ["map", "bool"]}
_HCL_PRIMITIVES = {
    ("simple", "string"): "string",
    ("simple", "number"): "number",
    ("simple", "boolean"): "bool",
    ("list", "stringList"): ["list", "string"],
    ("set", "stringList"): ["set", "string"],
    ("list", "numberList"): ["list", "number"],
    ("set", "numberList"): ["set", "number"],
    ("map", "stringMap"): ["map", "string"],
    ("map", "numberMap"): ["map", "number"],
    ("map", "booleanMap"): ["map", "bool"],
}


class SchemaError(Exception):
    """The generated sources did not have the shape this module knows."""


@dataclass
class Member:
    """One field of a generated class, as its comment and code describe it."""

    name: str
    computed: bool
    optional: bool
    required: bool
    code: str
    nested_class: str | None = None
    wraps_set: bool | None = None
    getter: Any = None  # a cty type for primitive getters


@dataclass
class Module:
    """One generated module (``lib/<name>/index.js``): its classes and HCL functions."""

    path: str
    text: str
    classes: dict[str, str] = field(default_factory=dict)
    functions: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, path: str, text: str) -> Module:
        mod = cls(path, text)
        for regex, into in ((_CLASS_RE, mod.classes), (_FUNC_RE, mod.functions)):
            for m in regex.finditer(text):
                end = text.find("\n}\n", m.end())
                if end < 0:
                    raise SchemaError(f"{path}: no end for {m.group(1)}")
                into[m.group(1)] = text[m.end() : end]
        return mod

    def members(self, class_name: str) -> dict[str, Member]:
        body = self._class(class_name)
        found = list(_MEMBER_RE.finditer(body))
        out: dict[str, Member] = {}
        for i, m in enumerate(found):
            end = found[i + 1].start() if i + 1 < len(found) else len(body)
            code = body[m.end() : end]
            mem = Member(
                m.group(1), m.group(2) == "true", m.group(3) == "true", m.group(4) == "true", code
            )
            if nested := _NESTED_RE.search(code):
                if nested.group(2) != mem.name:
                    raise SchemaError(
                        f"{self.path}: {class_name}.{mem.name} refers to {nested.group(2)}"
                    )
                mem.nested_class = nested.group(1)
                mem.wraps_set = nested.group(3) == "true" if nested.group(3) else None
            elif mapped := _MAP_RE.search(code):
                if mapped.group(1) not in _MAP_TYPES or mapped.group(2) != mem.name:
                    raise SchemaError(
                        f"{self.path}: {class_name}.{mem.name}: unknown map {mapped.group(0)}"
                    )
                mem.getter = _MAP_TYPES[mapped.group(1)]
            elif getter := _GETTER_RE.search(code):
                kind, name = getter.group(2), getter.group(3)
                if kind not in _GETTER_TYPES or name != mem.name:
                    raise SchemaError(
                        f"{self.path}: {class_name}.{mem.name}: unknown getter {getter.group(0)}"
                    )
                cty = _GETTER_TYPES[kind]
                if getter.group(1):  # Fn.tolist(...) around a list getter: the attribute is a set
                    if not isinstance(cty, list) or cty[0] != "list":
                        raise SchemaError(f"{self.path}: {class_name}.{mem.name}: tolist on {kind}")
                    cty = ["set", cty[1]]
                mem.getter = cty
            elif not re.match(
                r"^\n    _\w+;\n    get \w+\(\) \{\n        return this\._\w+;", code
            ):
                raise SchemaError(f"{self.path}: {class_name}.{mem.name}: unrecognised field code")
            # else: a plain input field (the provider has no getters), typed by its config entry
            out[mem.name] = mem
        return out

    def hcl_entries(self, class_name: str, *, top_level: bool) -> dict[str, tuple[bool, str, str]]:
        """Config keys of a struct: name -> (is_block, type, storageClassType)."""
        if top_level:
            body = self._class(class_name)
            start = body.find("synthesizeHclAttributes() {")
            if start < 0:
                raise SchemaError(f"{self.path}: {class_name} has no synthesizeHclAttributes")
            body = body[start:]
        else:
            struct = class_name.removesuffix("OutputReference")
            fname = struct[0].lower() + struct[1:] + "ToHclTerraform"
            if fname not in self.functions:
                raise SchemaError(f"{self.path}: no {fname} for {class_name}")
            body = self.functions[fname]
        return {
            m.group(1): (m.group(3) == "true", m.group(4), m.group(5))
            for m in _HCL_ENTRY_RE.finditer(body)
        }

    def provider_block(self, function: str, dts: str) -> dict[str, Any]:
        """A provider block's schema: its ``...ToHclTerraform`` function plus its d.ts interface.

        Provider classes have no output references, so a nested block's fields are read from the
        function that renders it (names, types) and the TypeScript interface (``x?:`` optional).
        """
        body = self.functions.get(function)
        if body is None:
            raise SchemaError(f"{self.path}: no function {function}")
        struct = function[0].upper() + function[1:].removesuffix("ToHclTerraform")
        iface = re.search(rf"^export interface {struct} \{{\n(.*?)^\}}", dts, re.M | re.S)
        if iface is None:
            raise SchemaError(f"{self.path}: no interface {struct} in index.d.ts")
        props = dict(re.findall(r"^    readonly (\w+)(\??):", iface.group(1), re.M))
        attributes: dict[str, Any] = {}
        for m in _HCL_ENTRY_RE.finditer(body):
            name, value, is_block, kind, storage = m.groups()
            camel = re.search(r"\(struct\.(\w+)\)", value)
            cty = _HCL_PRIMITIVES.get((kind, storage))
            if is_block == "true" or camel is None or cty is None or camel.group(1) not in props:
                raise SchemaError(f"{self.path}: {function}.{name}: {kind}/{storage}")
            flag = "optional" if props[camel.group(1)] == "?" else "required"
            attributes[name] = {"type": cty, flag: True}
        return {"attributes": attributes}

    def element_class(self, list_class: str) -> str:
        m = _LIST_GET_RE.search(self._class(list_class))
        if m is None:
            raise SchemaError(f"{self.path}: {list_class} has no get(index)")
        return m.group(1)

    def _class(self, name: str) -> str:
        if name not in self.classes:
            raise SchemaError(f"{self.path}: no class {name}")
        return self.classes[name]


def _flags(mem: Member) -> dict[str, bool]:
    flags = {k: True for k in ("required", "optional", "computed") if getattr(mem, k)}
    if not flags:
        raise SchemaError(f"{mem.name} is neither required, optional nor computed")
    return flags


def _object_type(mod: Module, class_name: str) -> list[Any]:
    """The cty object type of a computed nested object, from its class's getters."""
    attrs: dict[str, Any] = {}
    for name, mem in mod.members(class_name).items():
        attrs[name] = _attr_type(mod, mem)
    return ["object", attrs]


def _attr_type(mod: Module, mem: Member) -> Any:
    if mem.nested_class is None:
        return mem.getter
    if mem.nested_class.endswith("List"):
        elem = _object_type(mod, mod.element_class(mem.nested_class))
        return ["set" if mem.wraps_set else "list", elem]
    if mem.nested_class.endswith("OutputReference"):
        return _object_type(mod, mem.nested_class)
    raise SchemaError(f"{mod.path}: {mem.name}: unknown nested class {mem.nested_class}")


def block_schema(
    mod: Module,
    class_name: str,
    *,
    top_level: bool,
    drop: tuple[str, ...] = (),
    dts: str | None = None,
) -> dict[str, Any]:
    """The schema block of a resource, data source, provider (with its ``dts``), or nested block."""
    members = mod.members(class_name)
    hcl = mod.hcl_entries(class_name, top_level=top_level)
    values = {}
    if dts is not None:
        body = mod.classes[class_name]
        values = {
            m.group(1): m.group(2)
            for m in _HCL_ENTRY_RE.finditer(body[body.find("synthesizeHclAttributes") :])
        }
    unknown = set(hcl) - set(members)
    if unknown:
        raise SchemaError(
            f"{mod.path}: {class_name}: config keys without a field comment: {sorted(unknown)}"
        )
    attributes: dict[str, Any] = {}
    block_types: dict[str, Any] = {}
    for name, mem in sorted(members.items()):
        if name in drop:
            continue
        entry = hcl.get(name)
        if entry is None:  # not settable in configuration: a computed-only attribute
            if not mem.computed or mem.optional or mem.required:
                raise SchemaError(
                    f"{mod.path}: {class_name}.{name} is settable but not in the config"
                )
            attributes[name] = {"type": _attr_type(mod, mem), "computed": True}
            continue
        is_block, kind, storage = entry
        if is_block and dts is not None:
            fn = re.search(r"(\w+ToHclTerraform)", values[name])
            if kind != "list" or fn is None:
                raise SchemaError(f"{mod.path}: {class_name}.{name}: provider block {kind}")
            block_types[name] = {
                "nesting_mode": "list",
                "block": mod.provider_block(fn.group(1), dts),
            }
            continue
        if is_block:
            if kind not in _NESTING or mem.nested_class is None:
                raise SchemaError(f"{mod.path}: {class_name}.{name}: block of kind {kind}")
            if mem.nested_class.endswith("List"):
                elem_class, max_items = mod.element_class(mem.nested_class), None
                if mem.wraps_set != (kind == "set"):
                    raise SchemaError(
                        f"{mod.path}: {class_name}.{name}: {kind} block, wrapsSet {mem.wraps_set}"
                    )
            else:
                elem_class, max_items = mem.nested_class, (1 if kind != "struct" else None)
            nested: dict[str, Any] = {
                "nesting_mode": _NESTING[kind],
                "block": block_schema(mod, elem_class, top_level=False),
            }
            if kind != "struct":
                if mem.required:
                    nested["min_items"] = 1
                if max_items is not None:
                    nested["max_items"] = max_items
            block_types[name] = nested
            continue
        cty = _HCL_PRIMITIVES.get((kind, storage))
        if cty is None:  # a nested attribute object (framework resources), not a block
            if mem.nested_class is None:
                raise SchemaError(f"{mod.path}: {class_name}.{name}: {kind}/{storage}")
            cty = _attr_type(mod, mem)
        elif mem.getter is not None and mem.getter != cty:
            raise SchemaError(
                f"{mod.path}: {class_name}.{name}: config says {cty}, getter {mem.getter}"
            )
        attributes[name] = {"type": cty, **_flags(mem)}
    out: dict[str, Any] = {"attributes": attributes}
    if block_types:
        out["block_types"] = block_types
    return out


def _module_name(type_name: str, *, data: bool) -> str:
    """The folder of a type: ``google_redis_instance`` -> ``redis-instance``."""
    base = type_name.replace("_", "-")
    return f"data-{base}" if data else base.removeprefix("google-")


def read_modules(wheel: Path, names: set[str]) -> tuple[dict[str, Module], str]:
    """The generated ``lib/<name>/index.js`` modules from the wheel's jsii tarball, and the
    provider's ``index.d.ts``."""
    with zipfile.ZipFile(wheel) as zf:
        inner = [n for n in zf.namelist() if n.endswith(".jsii.tgz")]
        if len(inner) != 1:
            raise SchemaError(f"{wheel}: expected one jsii tarball, found {inner}")
        data = zf.read(inner[0])
    wanted = {f"package/lib/{n}/index.js": n for n in names}
    dts_name = "package/lib/provider/index.d.ts"
    out: dict[str, Module] = {}
    dts = ""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
        for member in tf:
            if member.name in wanted or member.name == dts_name:
                fh = tf.extractfile(member)
                assert fh is not None
                text = fh.read().decode()
                if member.name == dts_name:
                    dts = text
                else:
                    out[wanted[member.name]] = Module.parse(member.name, text)
    missing = names - set(out)
    if missing:
        raise SchemaError(f"not in hashicorp/google (per {wheel.name}): {sorted(missing)}")
    if not dts:
        raise SchemaError(f"{wheel.name}: no {dts_name}")
    return out, dts


_USE_RE = re.compile(r'^\s*(resource|data)\s+"(google_\w+)"', re.M)


def used_types(config_dir: Path) -> tuple[set[str], set[str]]:
    """Resource and data-source types named in a configuration's .tf files (tests included)."""
    resources: set[str] = set()
    data: set[str] = set()
    for path in sorted(config_dir.rglob("*.tf")):
        if ".terraform" in path.parts:
            continue
        for kind, name in _USE_RE.findall(path.read_text()):
            (resources if kind == "resource" else data).add(name)
    return resources, data


def derive(wheel: Path, resources: set[str], data_sources: set[str]) -> dict[str, Any]:
    """The provider schema, in the format of ``terraform providers schema -json``."""
    names = {"provider"}
    names |= {_module_name(r, data=False) for r in resources}
    names |= {_module_name(d, data=True) for d in data_sources}
    modules, provider_dts = read_modules(wheel, names)

    def top(
        mod_name: str, tf_type: str, *, drop: tuple[str, ...] = (), dts: str | None = None
    ) -> dict[str, Any]:
        mod = modules[mod_name]
        for cls_name, body in mod.classes.items():
            m = _TF_TYPE_RE.search(body)
            if m and m.group(1) == tf_type:
                block = block_schema(mod, cls_name, top_level=True, drop=drop, dts=dts)
                return {"version": 0, "block": block}
        raise SchemaError(f"{mod.path}: no class for {tf_type}")

    return {
        "format_version": "1.0",
        "provider_schemas": {
            PROVIDER_ADDRESS: {
                # `alias` is a Terraform meta-argument that cdktn adds to every provider class.
                "provider": top("provider", "google", drop=("alias",), dts=provider_dts),
                "resource_schemas": {
                    r: top(_module_name(r, data=False), r) for r in sorted(resources)
                },
                "data_source_schemas": {
                    d: top(_module_name(d, data=True), d) for d in sorted(data_sources)
                },
            }
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, required=True, help="cdktn_provider_google-*.whl")
    parser.add_argument("--sha256", help="expected SHA-256 of the wheel")
    parser.add_argument(
        "--config", type=Path, required=True, help="Terraform configuration to scan"
    )
    parser.add_argument("--out", type=Path, required=True, help="schema JSON to write")
    args = parser.parse_args(argv)
    if args.sha256:
        digest = hashlib.sha256(args.wheel.read_bytes()).hexdigest()
        if digest != args.sha256:
            print(f"{args.wheel}: SHA-256 {digest}, expected {args.sha256}", file=sys.stderr)
            return 1
    resources, data = used_types(args.config)
    try:
        schema = derive(args.wheel, resources, data)
    except SchemaError as exc:
        print(f"provider schema: {exc}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
    print(
        f"provider schema: {len(resources)} resource, {len(data)} data-source types -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
