"""Every HypervisorConfig field is documented where it is declared, with its unit when it is
a number (as Kata's Go code documents its HypervisorConfig)."""

from __future__ import annotations

import ast
import dataclasses
import inspect

from virtcontainers.config import HypervisorConfig, model

UNITS = ("MiB", "bytes", "count")


def field_docs() -> dict[str, str]:
    """Field name -> the string literal that follows its declaration in the class body."""
    tree = ast.parse(inspect.getsource(model))
    [cls] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "HypervisorConfig"]
    docs: dict[str, str] = {}
    for stmt, nxt in zip(cls.body, cls.body[1:], strict=False):
        documented = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and documented:
            assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
            docs[stmt.target.id] = str(nxt.value.value)
    return docs


def test_every_field_has_a_docstring_and_numbers_their_unit() -> None:
    docs = field_docs()
    for f in dataclasses.fields(HypervisorConfig):
        if f.name.startswith("_"):
            continue
        assert docs.get(f.name, "").strip(), f"{f.name} has no docstring"
        if f.type == "int":
            assert any(u in docs[f.name] for u in UNITS), f"{f.name}: no unit in {docs[f.name]!r}"
