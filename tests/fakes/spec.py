"""Validate HTTP requests against an OpenAPI 3 or Swagger 2 document, for spec-checking fake VMMs.

Load a spec YAML once (`ApiSpec.load(path)`), then `spec.validate(method, path, body)` finds the
operation by method and path template (`/drives/{drive_id}`), checks path parameters and the
JSON body against the operation's schema with jsonschema (every `$ref` resolved inside the
document) and returns the `Operation`. Failures raise `SpecError` (unknown route, wrong
method, bad body) with a message naming the route and the offending field.

`strict=True` treats every object schema that lists properties as closed
(`additionalProperties: false` unless it says otherwise): Firecracker's server rejects unknown
fields, while the spec itself does not say so.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped, unused-ignore]
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

_METHODS = ("get", "put", "post", "patch", "delete", "head", "options")
_BASE_URI = "urn:vc-spec"


class SpecError(Exception):
    """A request does not match the spec."""

    def __init__(self, message: str, *, kind: str = "body", unknown_field: str = "") -> None:
        super().__init__(message)
        self.kind = kind  # "route", "method", "params", "body"
        self.unknown_field = unknown_field


@dataclass
class Operation:
    """One method on one path template."""

    method: str
    template: str
    operation_id: str
    body_schema: dict[str, Any] | None
    body_required: bool
    path_params: dict[str, dict[str, Any]]
    regex: re.Pattern[str] = field(repr=False)
    spec: dict[str, Any] = field(repr=False)


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}]+\})", template)
    out = []
    for p in parts:
        if p.startswith("{") and p.endswith("}"):
            out.append(f"(?P<{re.sub(r'[^A-Za-z0-9_]', '_', p[1:-1])}>[^/]+)")
        else:
            out.append(re.escape(p))
    return re.compile("^" + "".join(out) + "$")


def _close_objects(node: Any, name_map: bool = False) -> Any:
    """Deep copy of a schema tree where object schemas with properties forbid extra keys.

    `name_map` marks a `properties` mapping (names to schemas), which is not itself a schema.
    """
    if isinstance(node, dict):
        if name_map:
            return {k: _close_objects(v) for k, v in node.items()}
        out = {k: _close_objects(v, name_map=k == "properties") for k, v in node.items()}
        if isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_close_objects(v) for v in node]
    return node


class ApiSpec:
    """A loaded API description and a request validator built from it."""

    def __init__(self, doc: dict[str, Any], *, strict: bool = False, base_path: str = "") -> None:
        self.doc = _close_objects(doc) if strict else copy.deepcopy(doc)
        self.swagger = "swagger" in doc
        if base_path:
            self.base_path = base_path.rstrip("/")
        elif self.swagger:
            self.base_path = str(doc.get("basePath", "")).rstrip("/")
        else:
            servers = doc.get("servers") or [{}]
            url = str(servers[0].get("url", ""))
            self.base_path = re.sub(r"^[a-z]+://[^/]*", "", url).rstrip("/")
        resource = Resource.from_contents(self.doc, default_specification=DRAFT4)
        self.registry: Registry[Any] = Registry().with_resource(_BASE_URI, resource)
        self.operations: list[Operation] = []
        for template, item in (self.doc.get("paths") or {}).items():
            common = item.get("parameters", [])
            for method in _METHODS:
                if method in item:
                    self.operations.append(self._operation(method, template, item[method], common))

    @classmethod
    def load(cls, path: str | Path, *, strict: bool = False, base_path: str = "") -> ApiSpec:
        """Read a YAML (or JSON) spec file."""
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
        if not isinstance(doc, dict) or not ("swagger" in doc or "openapi" in doc):
            raise ValueError(f"{path}: not an OpenAPI/Swagger document")
        return cls(doc, strict=strict, base_path=base_path)

    def _operation(
        self, method: str, template: str, op: dict[str, Any], common: list[Any]
    ) -> Operation:
        params = [self._deref(p) for p in [*common, *op.get("parameters", [])]]
        body_schema: dict[str, Any] | None = None
        body_required = False
        path_params: dict[str, dict[str, Any]] = {}
        for p in params:
            if p.get("in") == "body":
                body_schema = p.get("schema")
                body_required = bool(p.get("required", False))
            elif p.get("in") == "path":
                schema = p.get("schema") or {k: v for k, v in p.items() if k in ("type", "enum")}
                path_params[p["name"]] = schema
        if "requestBody" in op:
            rb = self._deref(op["requestBody"])
            content = rb.get("content") or {}
            media: dict[str, Any] = content.get("application/json") or next(
                iter(content.values()), {}
            )
            body_schema = media.get("schema")
            body_required = bool(rb.get("required", False))
        return Operation(
            method=method.upper(),
            template=template,
            operation_id=str(op.get("operationId", f"{method} {template}")),
            body_schema=body_schema,
            body_required=body_required,
            path_params=path_params,
            regex=_template_regex(template),
            spec=op,
        )

    def _deref(self, node: Any) -> dict[str, Any]:
        seen = 0
        while isinstance(node, dict) and "$ref" in node:
            ref = str(node["$ref"])
            if not ref.startswith("#/"):
                raise ValueError(f"external $ref {ref!r} is not supported")
            target: Any = self.doc
            for part in ref[2:].split("/"):
                target = target[part.replace("~1", "/").replace("~0", "~")]
            node = target
            seen += 1
            if seen > 32:
                raise ValueError(f"$ref loop at {ref!r}")
        return dict(node) if isinstance(node, Mapping) else {}

    def strip_base(self, path: str) -> str:
        """The request path without query string and without the spec's base path."""
        path = path.split("?", 1)[0]
        if self.base_path and path.startswith(self.base_path + "/"):
            path = path[len(self.base_path) :]
        return path or "/"

    def find(self, method: str, path: str) -> tuple[Operation, dict[str, str]]:
        """The operation for `method path` and its path parameters; `SpecError` if none."""
        path = self.strip_base(path)
        method = method.upper()
        allowed = []
        for op in self.operations:
            m = op.regex.match(path)
            if m:
                if op.method == method:
                    names = list(op.path_params) or list(m.groupdict())
                    values = list(m.groupdict().values())
                    return op, dict(zip(names, values, strict=False))
                allowed.append(op.method)
        if allowed:
            raise SpecError(
                f"{method} {path}: method not allowed (spec has {', '.join(sorted(allowed))})",
                kind="method",
            )
        raise SpecError(f"{method} {path}: no such route in the spec", kind="route")

    def schema_validator(self, schema: dict[str, Any]) -> jsonschema.protocols.Validator:
        """A draft-4 validator for a schema fragment whose `$ref`s point into the spec."""
        rebased = _rebase_refs(schema)
        return jsonschema.Draft4Validator(rebased, registry=self.registry)

    def validate_value(self, schema: dict[str, Any], value: Any, where: str) -> None:
        """Validate `value` against `schema`; `SpecError` names the first offending field."""
        validator = self.schema_validator(schema)
        errors = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
        if not errors:
            return
        err = errors[0]
        loc = "/".join(str(p) for p in err.absolute_path) or "<body>"
        unknown = ""
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            props = err.schema.get("properties", {}) if isinstance(err.schema, dict) else {}
            extra = [k for k in err.instance if k not in props]
            unknown = extra[0] if extra else ""
        raise SpecError(f"{where}: {loc}: {err.message}", unknown_field=unknown)

    def validate(self, method: str, path: str, body: Any = None, *, raw: bytes = b"") -> Operation:
        """Check one request; `body` is the decoded JSON (or None), `raw` the undecoded bytes."""
        op, params = self.find(method, path)
        where = f"{op.method} {op.template}"
        for name, value in params.items():
            schema = op.path_params.get(name)
            if schema:
                self.validate_value(schema, value, f"{where} path parameter {name}")
        if op.body_schema is None:
            if body is not None:
                raise SpecError(f"{where}: takes no request body")
            return op
        if body is None:
            if raw.strip():
                raise SpecError(f"{where}: body is not JSON")
            if op.body_required:
                raise SpecError(f"{where}: a JSON body is required")
            return op
        self.validate_value(op.body_schema, body, where)
        return op


def _rebase_refs(node: Any) -> Any:
    """Point local `#/...` references at the registered spec document."""
    if isinstance(node, dict):
        out = {k: _rebase_refs(v) for k, v in node.items()}
        ref = out.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            out["$ref"] = _BASE_URI + ref
        return out
    if isinstance(node, list):
        return [_rebase_refs(v) for v in node]
    return node


def decode_json(raw: bytes) -> Any:
    """Decode a request body; empty means None. `SpecError` on malformed JSON."""
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise SpecError(f"body is not valid JSON: {e}") from e
