"""convnextv2-export: ONNX / TorchScript round trips, metadata, precision bounds and CLI failures."""
import os

import numpy as np
import pytest
import torch

from convnextv2_hub.cli import export as export_cli
from convnextv2_hub.inference import export as ex
from convnextv2_hub.models.convnextv2 import convnextv2

SIZE = 64


def _randomised(seed: int = 0, num_classes: int = 1000):
    # GRN gamma/beta start at zero (GRN = identity); randomise every parameter so GRN is exercised.
    torch.manual_seed(seed)
    m = convnextv2("atto", num_classes=num_classes).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m


@pytest.fixture(scope="module")
def model():
    return _randomised()


@pytest.fixture(scope="module")
def photos():
    return ex.verification_inputs(SIZE, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture(scope="module")
def onnx_fp32(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "atto.onnx"
    report = ex.export_onnx(model, path, image_size=SIZE)
    return path, report


def test_onnx_fp32_round_trip_batch_1_and_3(model, onnx_fp32, photos):
    path, report = onnx_fp32
    assert report.passed and report.max_abs_diff <= 1e-4 and report.top1_agreement == 1.0
    sess = ex.onnx_session(path)
    for x in (photos[1], photos[3], photos[2]):  # natural batch 1, natural batch 3, random batch 3
        with torch.no_grad():
            ref = model(x).numpy()
        out = sess.run(None, {"input": x.numpy()})[0]
        assert out.shape == (x.shape[0], 1000)
        assert np.abs(out - ref).max() <= 1e-4


def test_onnx_metadata_read_back(onnx_fp32):
    meta = ex.read_metadata(onnx_fp32[0])
    assert meta["format"] == "convnextv2_hub" and meta["resolution"] == SIZE
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406]) and meta["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert meta["interpolation"] and meta["crop_mode"] and 0 < meta["crop_pct"] <= 1
    assert len(meta["label_names"]) == 1000 and meta["dynamic_batch"] is True and meta["opset"] == ex.DEFAULT_OPSET


def test_onnx_static_batch(model, tmp_path):
    path = tmp_path / "static.onnx"
    report = ex.export_onnx(model, path, image_size=SIZE, static_batch=2)
    assert report.passed and report.n_images == 4  # random + natural, batch 2 each
    import onnx

    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 3, SIZE, SIZE]


def test_onnx_fp16_keeps_grn_statistics_in_fp32(model, tmp_path):
    path = tmp_path / "half.onnx"
    report = ex.export_onnx(model, path, image_size=SIZE, half=True)
    print(report)
    assert report.passed and report.min_cosine >= ex.HALF_COSINE
    import onnx

    graph = onnx.load(str(path)).graph
    reduce_l2 = [n for n in graph.node if n.op_type == "ReduceL2"]
    produced_by_cast_to_float = {o for n in graph.node if n.op_type == "Cast"
                                 and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute)
                                 for o in n.output}
    assert reduce_l2 and all(n.input[0] in produced_by_cast_to_float for n in reduce_l2)
    assert ex.read_metadata(path)["precision"] == "fp16"


def test_onnx_int8_agreement_is_measured(model, tmp_path):
    path = tmp_path / "int8.onnx"
    report = ex.export_onnx(model, path, image_size=SIZE, quantize="int8")
    print(report)  # the int8 top-1 agreement on random + natural inputs (reported, not gated)
    assert report.passed and report.min_cosine >= ex.INT8_COSINE
    assert report.top1_agreement >= 0.5


def test_torchscript_round_trip_and_metadata(model, photos, tmp_path):
    path = tmp_path / "atto.pt"
    report = ex.export_torchscript(model, path, image_size=SIZE)
    assert report.passed and report.max_abs_diff <= 1e-4
    loaded = torch.jit.load(str(path))
    for x in (photos[1][:1], photos[3]):  # batch 1 natural, batch 3 natural
        with torch.no_grad():
            assert (loaded(x) - model(x)).abs().max() <= 1e-4
    meta = ex.read_metadata(path)
    assert meta["exporter"] == "torch.jit.script" and len(meta["label_names"]) == 1000


def test_failed_verification_leaves_no_file(model, tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "FP32_ATOL", -1.0)  # nothing can pass: forces the failure path
    path = tmp_path / "bad.onnx"
    with pytest.raises(ex.ExportError, match="FAILED"):
        ex.export_onnx(model, path, image_size=SIZE)
    with pytest.raises(ex.ExportError, match="FAILED"):
        ex.export_torchscript(model, tmp_path / "bad.pt", image_size=SIZE)
    assert os.listdir(tmp_path) == []


def test_bad_arguments(model, tmp_path):
    with pytest.raises(ValueError, match="multiple of 32"):
        ex.export_onnx(model, tmp_path / "a.onnx", image_size=100)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ex.export_onnx(model, tmp_path / "missing" / "a.onnx", image_size=SIZE)
    (tmp_path / "a.onnx").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        ex.export_onnx(model, tmp_path / "a.onnx", image_size=SIZE)
    assert (tmp_path / "a.onnx").read_bytes() == b"keep me"
    with pytest.raises(ex.ExportError, match="opset 7"):
        ex.export_onnx(model, tmp_path / "b.onnx", image_size=SIZE, opset=7)
    assert sorted(os.listdir(tmp_path)) == ["a.onnx"]


# --- the command ------------------------------------------------------------------------------
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A 10-class Atto file that describes itself, as a fine-tune from the released FCMAE weights writes it."""
    from convnextv2_hub.checkpoints.io import save_checkpoint

    model = _randomised(1, num_classes=10)
    model.label_names, model.base_checkpoint = DIGITS, "atto.fcmae"
    return save_checkpoint(model, tmp_path_factory.mktemp("w") / "atto10.safetensors")


def _cli(*args):
    return export_cli.main([str(a) for a in args])


def test_cli_exports_and_overwrites(weights, tmp_path, capsys):
    out = tmp_path / "atto.onnx"
    # No model name and no --num-classes: the file says its size and head.
    base = ["--checkpoint-path", weights, "--image-size", SIZE, "--onnx", out]
    assert _cli(*base) == 0
    text = capsys.readouterr().out
    assert "verification PASSED (fp32" in text and "max|diff|" in text and "top-1 agreement" in text
    meta = ex.read_metadata(out)
    assert meta["num_classes"] == 10 and meta["variant"] == "atto" and meta["label_names"] == DIGITS
    assert meta["checkpoint"] == str(weights) and meta["base_checkpoint"] == "atto.fcmae"  # the real source
    before = out.read_bytes()
    assert _cli(*base) == 1  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
    assert _cli(*base, "--overwrite") == 0


@pytest.mark.parametrize("extra, message", [
    (["--image-size", 100], "multiple of 32"),
    (["--opset", 7], "opset 7"),
    (["--checkpoint-path", "/nonexistent/atto.safetensors"], ""),
])
def test_cli_failures_exit_non_zero_and_write_nothing(weights, tmp_path, capsys, extra, message):
    args = ["atto", "--checkpoint-path", weights, "--num-classes", 10, "--image-size", SIZE,
            "--onnx", tmp_path / "x.onnx"] + extra
    assert _cli(*args) == 1
    err = capsys.readouterr().err
    assert err.startswith("convnextv2-export: error:") and message in err
    assert os.listdir(tmp_path) == []


def test_cli_refuses_a_model_name_of_another_size_than_the_file(weights, tmp_path, capsys):
    assert _cli("tiny", "--checkpoint-path", weights, "--onnx", tmp_path / "x.onnx") == 1
    assert "holds a ConvNeXt V2-Atto, not 'tiny'" in capsys.readouterr().err and os.listdir(tmp_path) == []


def test_cli_broken_checkpoint_file(tmp_path, capsys):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 64)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert _cli("atto", "--checkpoint-path", broken, "--image-size", SIZE, "--torchscript", out_dir / "a.pt") == 1
    assert "error" in capsys.readouterr().err and os.listdir(out_dir) == []


def test_cli_missing_output_dir(weights, tmp_path, capsys):
    assert _cli("atto", "--checkpoint-path", weights, "--num-classes", 10, "--onnx", tmp_path / "no" / "a.onnx") == 1
    assert "does not exist" in capsys.readouterr().err


def test_cli_help_names_the_exporters_default_opset():
    assert export_cli.HELP_DEFAULT_OPSET == ex.DEFAULT_OPSET
