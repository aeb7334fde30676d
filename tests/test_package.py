"""Shape rules for the package's code that a reader relies on."""
import ast
from pathlib import Path

import convnextv2_hub

PACKAGE_DIR = Path(convnextv2_hub.__file__).parent
MAX_FUNCTION_LINES = 80


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in PACKAGE_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE_DIR)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_path_like_is_defined_once():
    defined = [str(p.relative_to(PACKAGE_DIR)) for p in PACKAGE_DIR.rglob("*.py")
               if "\nPathLike = " in p.read_text(encoding="utf-8")]
    assert defined == ["files.py"], defined
