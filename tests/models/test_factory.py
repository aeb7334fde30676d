"""create(): names, defaults, local checkpoints, torch.hub entry points."""
from pathlib import Path

import pytest
import torch

import convnextv2_hub as cvh
from convnextv2_hub.checkpoints.io import save_checkpoint

REPO = Path(__file__).resolve().parents[2]


def randomise_(model):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def test_create_resolves_names_to_checkpoints():
    m = cvh.create("atto")
    assert m.checkpoint.name == "atto.fcmae_ft_in1k" and m.num_classes == 1000
    m = cvh.create("convnextv2_nano.fcmae_ft_in22k_in1k_384")
    assert m.checkpoint.name == "nano.fcmae_ft_in22k_in1k_384" and m.checkpoint.resolution == 384
    assert cvh.create("nano").checkpoint.name == "nano.fcmae_ft_in22k_in1k"
    enc = cvh.create("atto.fcmae")
    assert enc.num_classes == 0 and enc(torch.randn(1, 3, 64, 64)).shape == (1, 320)


def test_create_with_options():
    m = cvh.create("atto", num_classes=7, drop_path_rate=0.1, head_init_scale=0.001)
    assert m.head.out_features == 7
    assert m.stages[3][1].drop_path.drop_prob == pytest.approx(0.1)
    assert m.head.weight.std() < 1e-4
    f = cvh.create("femto", features_only=True, out_indices=(2, 3))
    assert [o.shape[1] for o in f(torch.randn(1, 3, 64, 64))] == [192, 384]


def test_unknown_name_suggests_close_names():
    with pytest.raises(ValueError, match="tiny"):
        cvh.create("tinny")
    with pytest.raises(ValueError, match="fcmae_ft_in1k"):
        cvh.create("atto.fcmae_ft_in22k_in1k")  # atto has no 22k checkpoint


def test_create_from_local_checkpoint_and_new_head(tmp_path):
    torch.manual_seed(0)
    src = randomise_(cvh.create("atto")).eval()
    path = save_checkpoint(src, tmp_path / "atto.safetensors")
    same = cvh.create("atto", checkpoint_path=path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(same(x), src(x))
    with pytest.warns(UserWarning, match="head"):
        tuned = cvh.create("atto", num_classes=10, checkpoint_path=path).eval()
    with torch.no_grad():
        torch.testing.assert_close(tuned.forward_features(x), src.forward_features(x))
    assert tuned(x).shape == (2, 10)


def test_create_wrong_variant_checkpoint_is_an_error(tmp_path):
    path = save_checkpoint(cvh.create("atto"), tmp_path / "atto.safetensors")
    with pytest.raises(ValueError, match="atto"):
        cvh.create("femto", checkpoint_path=path)


def test_torch_hub_entry_points(tmp_path):
    torch.manual_seed(0)
    src = randomise_(cvh.create("atto")).eval()
    path = save_checkpoint(src, tmp_path / "w.safetensors")
    m = torch.hub.load(str(REPO), "convnextv2_atto", source="local", checkpoint_path=path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), src(x))
    hubconf = torch.hub._import_module("hubconf", str(REPO / "hubconf.py"))  # what torch.hub.load reads
    assert all(callable(getattr(hubconf, f"convnextv2_{v}")) for v in cvh.list_models())
    m = torch.hub.load(str(REPO), "convnextv2_nano", source="local", tag="fcmae_ft_in22k_in1k_384")
    assert m.checkpoint.resolution == 384


def test_models_with_their_checkpoint_entry_can_be_copied_and_pickled(tmp_path):
    import copy
    import pickle

    m = cvh.create("atto")
    assert copy.deepcopy(m).checkpoint is m.checkpoint
    back = pickle.loads(pickle.dumps(m.checkpoint))
    assert back == m.checkpoint and back.meta["top1"] == m.checkpoint.meta["top1"]
    with pytest.raises(TypeError):
        back.meta["top1"] = 0  # still read-only after the round trip
