"""Read the plugin's vLLM seams (:data:`vllm_affinity.compat.SEAMS`) from a vLLM source
tree WITHOUT importing it, so releases that cannot be installed here (vLLM 0.33 has no
CPU build) can still be checked against the compat layer.

    python -m vllm_affinity_tools.vllm_seams SRC_ROOT OUT.json

SRC_ROOT holds the ``vllm/`` package (e.g. the ``*.py`` files of a wheel:
``pip download --no-deps vllm==0.33.0`` then ``unzip 'vllm/*.py'``). The JSON maps each
seam's ``where`` to the positional parameter names of the function (``self`` dropped), or
``null`` for a class / module attribute that exists, and holds the dataclass fields of
``CommonAttentionMetadata`` and ``AttentionSpec`` (inherited ones included).
``tests/data/`` keeps the dumps of 0.33.0 and 0.34.0.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

from vllm_affinity import compat


class SourceTree:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._parsed: dict[str, ast.Module] = {}

    def module(self, name: str) -> tuple[ast.Module, str]:
        base = self.root / Path(*name.split("."))
        for path, pkg in ((base.with_suffix(".py"), False), (base / "__init__.py", True)):
            if path.is_file():
                if name not in self._parsed:
                    self._parsed[name] = ast.parse(path.read_text())
                return self._parsed[name], name if pkg else name.rpartition(".")[0]
        raise ImportError(f"no module {name} under {self.root}")

    def find(self, module: str, name: str, depth: int = 0):
        """(module, node) of top-level ``name`` in ``module``, following re-exports."""
        if depth > 8:
            raise AttributeError(name)
        tree, package = self.module(module)
        for node in tree.body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                return module, node
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    return module, node
        for node in tree.body:
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        src = node.module or ""
                        if node.level:
                            parts = package.split(".")
                            parts = parts[: len(parts) - node.level + 1]
                            src = ".".join(parts + ([src] if src else []))
                        return self.find(src, alias.name, depth + 1)
        raise AttributeError(f"{module} has no {name}")

    def member(self, module: str, cls: ast.ClassDef, name: str):
        for node in cls.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                return node
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    return node
        for base in cls.bases:  # inherited
            base_name = base.id if isinstance(base, ast.Name) else getattr(base, "attr", None)
            if not base_name:
                continue
            try:
                bmod, bnode = self.find(module, base_name)
            except (AttributeError, ImportError):
                continue
            if isinstance(bnode, ast.ClassDef):
                try:
                    return self.member(bmod, bnode, name)
                except AttributeError:
                    pass
        raise AttributeError(f"{cls.name} has no {name}")

    def resolve(self, where: str):
        module, _, qual = where.partition(":")
        parts = qual.split(".")
        mod, node = self.find(module, parts[0])
        for part in parts[1:]:
            node = self.member(mod, node, part)
        return mod, node

    def dataclass_fields(self, where: str) -> list[str]:
        mod, cls = self.resolve(where)
        out: list[str] = []
        for base in cls.bases:
            base_name = base.id if isinstance(base, ast.Name) else None
            if base_name:
                try:
                    bmod, bnode = self.find(mod, base_name)
                except (AttributeError, ImportError):
                    continue
                if isinstance(bnode, ast.ClassDef):
                    out += [f for f in self.dataclass_fields(f"{bmod}:{base_name}") if f not in out]
        for node in cls.body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id not in out:
                if not (isinstance(node.annotation, ast.Name) and node.annotation.id == "ClassVar"):
                    out.append(node.target.id)
        return out


def positional_names(fn: ast.FunctionDef) -> list[str]:
    args = [a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs]
    return [a for a in args if a not in ("self", "cls")]


def dump(root: Path) -> dict:
    tree = SourceTree(root)
    seams: dict[str, list[str] | None] = {}
    for seam in compat.all_seams():
        try:
            _, node = tree.resolve(seam.where)
        except (AttributeError, ImportError):
            continue  # absent: the JSON simply lacks it
        seams[seam.where] = positional_names(node) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
    return {
        "seams": seams,
        "fields": {
            "vllm.v1.attention.backend:CommonAttentionMetadata":
                tree.dataclass_fields("vllm.v1.attention.backend:CommonAttentionMetadata"),
            "vllm.v1.kv_cache_interface:AttentionSpec":
                tree.dataclass_fields("vllm.v1.kv_cache_interface:AttentionSpec"),
        },
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        raise SystemExit(__doc__)
    Path(argv[1]).write_text(json.dumps(dump(Path(argv[0])), indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
