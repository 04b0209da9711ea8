"""The package's data flow is one way (docs/architecture.md): kernels → lora (the op) → layers → model → methods →
integrations → demo. No module imports one of a higher layer, not even lazily inside a function; compat.py and
memory.py import nothing from pyflex; kernels import only torch, triton, each other and the op contract."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
RANK = {"kernels": 0, "lora": 1, "layers": 2, "model": 3, "methods": 4, "integrations": 5, "demo": 6}
SIDE = {"compat", "memory"}     # importable from every layer; import nothing from pyflex themselves


def _layer(module: str):
    """'pyflex.model.patch' → 'model'; side modules → their name; the package root → None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "pyflex" else None


def _sources():
    for path in sorted((ROOT / "pyflex").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        if rel.parts[1] == "kernels":     # the symlink to kernels/; read below under its installed name
            continue
        yield ".".join(rel.parts).removesuffix(".__init__"), path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        yield f"pyflex.kernels.{path.stem}".removesuffix(".__init__"), path


def _imports(module: str, path: pathlib.Path):
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, node.lineno
            for alias in node.names:   # `from pyflex import x` may import a submodule
                if target in ("pyflex",) or (target.startswith("pyflex.") and target.count(".") == 1):
                    yield f"{target}.{alias.name}", node.lineno


def test_no_module_imports_a_higher_layer():
    violations = []
    for module, path in _sources():
        own = _layer(module)
        if own is None:          # pyflex/__init__.py: the public surface, above everything
            continue
        for target, line in _imports(module, path):
            other = _layer(target)
            if not target.startswith("pyflex") or other is None or other == own:
                continue
            where = f"{path.relative_to(ROOT)}:{line} imports {target}"
            if own in SIDE:
                violations.append(where + " (side modules import nothing from pyflex)")
            elif other in SIDE:
                continue
            elif own == "kernels":
                if target != "pyflex.lora.contract":
                    violations.append(where + " (kernels import only torch, triton and pyflex.lora.contract)")
            elif other not in RANK or RANK[other] > RANK[own]:
                violations.append(where + f" ({own} is below {other})")
    assert not violations, "\n".join(violations)
