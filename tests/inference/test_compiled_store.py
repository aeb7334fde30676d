"""The store of compiled CPU graphs: `convnextv2 compile` builds an entry in one process, a Predictor in
another loads it and matches eager fp32 (through two micro-batched segments); stale and corrupt entries are
detected, removed and built again."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import normalised_photos

from convnextv2_hub.checkpoints.io import save_checkpoint
from convnextv2_hub.inference import compiled_store
from convnextv2_hub.inference.predictor import COMPILE_SECONDS_PER_BLOCK, Predictor, load_classifier
from convnextv2_hub.models.convnextv2 import convnextv2

# At 224² and batch 2 the compiled path runs two segments: stage 1 one image at a time, stages 2-4 both.
SIZE, BATCH = 224, 2


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An Atto file, and a store into which `convnextv2 compile` (its own process) compiled it for batch 2."""
    torch.manual_seed(3)
    model = convnextv2("atto", num_classes=10)
    with torch.no_grad():  # every parameter random: GRN's zero init would make it an identity
        for p in model.parameters():
            p.normal_(0, 0.1)
    root = tmp_path_factory.mktemp("store")
    weights = save_checkpoint(model, root / "atto10.safetensors")
    store = root / "compiled"
    env = dict(os.environ, CONVNEXTV2_HUB_COMPILED_DIR=str(store))
    cmd = [sys.executable, "-m", "convnextv2_hub.cli.main", "compile", "--checkpoint-path", str(weights),
           "--batch-size", str(BATCH), "--image-size", str(SIZE), "--no-autotune",
           "--threads", str(torch.get_num_threads())]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return weights, store, done


@pytest.fixture(scope="module")
def photo_batch():
    return normalised_photos(SIZE)[:BATCH]


def _predictor(weights, backend="compile"):
    model = load_classifier("atto", checkpoint_path=weights)
    return Predictor(model, backend=backend, device="cpu", batch_size=BATCH, autotune=False, background=False)


def _check(predictor, weights, x):
    out = predictor(x)
    with torch.no_grad():
        ref = load_classifier("atto", checkpoint_path=weights).eval()(x)
    if predictor.precision == "fp32":
        assert (out - ref).abs().max() <= 1e-4
    else:
        assert torch.nn.functional.cosine_similarity(out, ref).min() >= 0.999
    return out


def test_a_new_process_loads_what_the_compile_command_built(built, photo_batch, monkeypatch):
    weights, store, done = built
    assert f"batch {BATCH}: built" in done.stdout and "compiled segment 2 of 2" in done.stderr
    monkeypatch.setenv("CONVNEXTV2_HUB_COMPILED_DIR", str(store))
    lines = []
    p = _predictor(weights)
    p._progress = lines.append
    assert p.is_compiled_stored(photo_batch)
    out = _check(p, weights, photo_batch)
    assert p.compile_events == ["loaded"]  # nothing compiled in this process
    assert any("loading the compiled model" in line for line in lines)
    assert torch.equal(p(photo_batch), out)
    # auto prices the switch to stored graphs as a load, not as a compile
    auto = _predictor(weights, backend="auto")
    auto(photo_batch)
    compiling = COMPILE_SECONDS_PER_BLOCK * sum(auto._model.depths)
    assert auto._switch_cost("compile", photo_batch, False) < compiling / 10
    [entry] = compiled_store.entries()
    assert entry["manifest"]["key"]["input"]["shape"] == [BATCH, 3, SIZE, SIZE]
    assert entry["manifest"]["key"]["plan"] == [[0, 0, 1], [1, 3, 2]]


@pytest.mark.parametrize("damage", ["corrupt", "stale"])
def test_a_damaged_entry_is_removed_and_built_again(built, photo_batch, damage, tmp_path, monkeypatch):
    weights, store, _ = built
    [pristine] = [d for d in store.iterdir() if not d.name.startswith(".")]
    monkeypatch.setenv("CONVNEXTV2_HUB_COMPILED_DIR", str(tmp_path))
    entry = tmp_path / pristine.name
    shutil.copytree(pristine, entry)
    if damage == "corrupt":
        package = next(entry.glob("*.pt2"))
        data = bytearray(package.read_bytes())
        data[len(data) // 2] ^= 0xFF
        package.write_bytes(bytes(data))
    else:
        manifest = json.loads((entry / "manifest.json").read_text())
        manifest["key"]["torch"] = "2.0.0 an older torch"
        (entry / "manifest.json").write_text(json.dumps(manifest))
    builds = []

    def build_in_child(model, key, folder, say):  # the real build is what the `built` fixture ran
        builds.append(key)
        assert not folder.exists()  # the damaged entry was removed first
        shutil.copytree(pristine, folder)

    monkeypatch.setattr(compiled_store, "build_in_child", build_in_child)
    p = _predictor(weights)
    with pytest.warns(RuntimeWarning, match=f"are {damage}"):
        _check(p, weights, photo_batch)
    assert len(builds) == 1 and p.compile_events == ["built"]
    assert json.loads((entry / "manifest.json").read_text())["key"] == builds[0]


def test_a_failed_build_names_the_compiler_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVNEXTV2_HUB_COMPILED_DIR", str(tmp_path))
    key = {"threads": 1, "native_kernel": False, "input": {"shape": [1, 3, 32, 32], "stride": [3072, 1, 96, 3],
                                                           "dtype": "torch.float32"},
           "plan": [[0, 3, 1]], "pre_logits": False, "autocast": None, "autotune": False}
    # A model whose forward cannot be exported: the child's error comes back, nothing is stored.
    with pytest.raises(RuntimeError, match="compiling the model failed"):
        compiled_store.build_in_child(torch.nn.Linear(2, 2), key, tmp_path / "entry", say=lambda line: None)
    assert not (tmp_path / "entry").exists() and compiled_store.entries(tmp_path) == []


def test_the_key_tells_apart_everything_the_graphs_depend_on(one_thread):
    from convnextv2_hub.inference.compile_backend import CompiledConvNeXtV2

    def key(model, x, **fields):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fields.pop("bf16", False)):
            return compiled_store.entry_dir(CompiledConvNeXtV2(model.eval(), **fields)._store_key(x))

    torch.manual_seed(0)
    model = convnextv2("atto", num_classes=10)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    base = key(model, x)
    same = convnextv2("atto", num_classes=10)
    same.load_state_dict(model.state_dict())
    assert key(same, x) == base  # another object, the same weights and structure: the same entry
    other_weights = convnextv2("atto", num_classes=10)  # another random init
    # GRN's L1 aggregation has the same parameters as its L2 one: only the structure tells them apart.
    l1 = convnextv2("atto", num_classes=10, grn_aggregation="l1")
    l1.load_state_dict(model.state_dict())
    others = [key(other_weights, x), key(l1, x), key(model, x[:1]), key(model, x.contiguous()),
              key(model, x, bf16=True), key(model, x, autotune=False), key(model, x, pre_logits=True)]
    torch.set_num_threads(2)
    others.append(key(model, x))
    assert base not in others and len(set(others)) == len(others)


def test_the_compile_command_lists_and_clears_the_store(built, tmp_path, monkeypatch, capsys):
    from convnextv2_hub.cli.main import main

    _, store, _ = built
    copy = tmp_path / "compiled"
    shutil.copytree(store, copy)
    monkeypatch.setenv("CONVNEXTV2_HUB_COMPILED_DIR", str(copy))
    assert main(["compile", "--list"]) == 0
    listed = capsys.readouterr().out
    [entry] = [d.name for d in copy.iterdir() if not d.name.startswith(".")]
    assert "1 entries" in listed and entry in listed and f"input {BATCH}x3x{SIZE}x{SIZE}" in listed
    assert "another torch or CPU" not in listed  # built here, usable here
    assert main(["compile", "--clear"]) == 0
    assert not copy.exists() and "removed" in capsys.readouterr().out
