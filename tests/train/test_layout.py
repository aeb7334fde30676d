"""The trainer's code layout: ``Run`` has one home, modules import only each other's public names,
and no function of the trainer is too long to read as a unit."""
import ast
from pathlib import Path

import convnextv2_hub
from convnextv2_hub.train import engine, run

PACKAGE_DIR = Path(convnextv2_hub.__file__).parent
TRAINER_FILES = sorted((PACKAGE_DIR / "train").glob("*.py")) + [PACKAGE_DIR / "cli" / "train.py"]
MAX_FUNCTION_LINES = 80


def test_run_lives_in_train_run_and_engine_re_exports_it():
    assert engine.Run is run.Run and run.Run.__module__ == "convnextv2_hub.train.run"


def test_trainer_modules_import_no_private_names():
    private = []
    for path in TRAINER_FILES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                private += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert not private, private


def test_trainer_functions_are_short():
    long = []
    for path in TRAINER_FILES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.name} ({n} lines)")
    assert not long, long
