"""``Run`` has one home (the package-wide layout rules are in tests/test_imports.py and tests/test_package.py)."""
from convnextv2_hub.train import engine, run


def test_run_lives_in_train_run_and_engine_re_exports_it():
    assert engine.Run is run.Run and run.Run.__module__ == "convnextv2_hub.train.run"
