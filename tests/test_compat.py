"""Module paths of 0.1.0 keep importing (the same module objects, with a FutureWarning), and the
package's public names survive an import of the old submodule of the same name."""
import importlib
import json
import subprocess
import sys

import pytest

from convnextv2_hub.compat import MOVED


def test_old_module_paths_are_the_new_modules():
    # A fresh interpreter, so that no test has imported the new modules already.
    code = (
        "import importlib, json, sys, warnings\n"
        "moved = json.loads(sys.argv[1])\n"
        "for old, new in moved.items():\n"
        "    with warnings.catch_warnings(record=True) as w:\n"
        "        warnings.simplefilter('always')\n"
        "        mod = importlib.import_module('convnextv2_hub.' + old)\n"
        "    assert mod is importlib.import_module('convnextv2_hub.' + new), (old, new)\n"
        "    assert any(issubclass(x.category, FutureWarning) and 'convnextv2_hub.' + new in str(x.message)\n"
        "               for x in w), (old, [str(x.message) for x in w])\n"
        "print(len(moved))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, json.dumps(MOVED)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(len(MOVED))


def test_predict_stays_the_function_after_importing_the_old_predict_module():
    import convnextv2_hub as cvh

    with pytest.warns(FutureWarning, match="inference.predictor"):
        module = importlib.import_module("convnextv2_hub.predict")
    assert callable(cvh.predict) and cvh.predict is module.predict
    from convnextv2_hub.predict import Predictor  # the old spelling users wrote

    assert Predictor is cvh.Predictor
