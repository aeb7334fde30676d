"""Push to and pull from a loopback Hub (``conftest.PushableHub``, the endpoints huggingface_hub calls):
``ConvNeXtV2.push_to_hub`` / ``convnextv2 push`` upload one commit; ``create("hf-hub:...")`` and
``ConvNeXtV2.from_pretrained`` pull it back in a fresh cache with the same logits, labels and preprocessing;
the timm/ and hf/ subfolders load in the real timm and transformers exactly as the model card says; an
interrupted push leaves nothing a pull takes as complete."""
from __future__ import annotations

import json
import re

import huggingface_hub
import pytest
import torch

import convnextv2_hub as cvh
from convnextv2_hub import ConvNeXtV2
from convnextv2_hub.checkpoints.download import sha256_file
from convnextv2_hub.checkpoints.hub import hub_repo_id
from convnextv2_hub.checkpoints.model_card import choose_license
from convnextv2_hub.checkpoints.reading import CheckpointError

LABELS = ["cat", "rocket", "coffee"]
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


@pytest.fixture
def atto3(one_thread) -> ConvNeXtV2:
    """Atto with a 3-class head and label names, every parameter random (GRN too: zero GRN is the identity)."""
    model = cvh.create("atto", num_classes=3).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.label_names = list(LABELS)
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


def fresh_cache(tmp_path, monkeypatch, name: str) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / name))


def test_push_one_commit_then_pull_in_a_fresh_cache_and_offline(pushable_hub, atto3, tmp_path, monkeypatch):
    url = atto3.push_to_hub("alice/atto-three", private=True)
    commits = [p for m, p in pushable_hub.server.requests if m == "POST" and "/commit/" in p]
    assert url.startswith(f"{pushable_hub.url}/alice/atto-three/commit/")
    assert len(pushable_hub.commits["alice/atto-three"]) == 2  # the repo's first commit, then ours: one commit
    assert len(commits) == 1
    assert sorted(pushable_hub.head("alice/atto-three")) == [".gitattributes", "README.md", "config.json",
                                                              "model.safetensors"]
    assert set(pushable_hub.tokens) - {""} == {"Bearer hf_loopback_test_token"}

    fresh_cache(tmp_path, monkeypatch, "pull_home")
    pulled = cvh.create("hf-hub:alice/atto-three", pretrained=True, progress=False)
    torch.testing.assert_close(logits(pulled), logits(atto3), atol=0, rtol=0)
    assert pulled.label_names == LABELS and pulled.num_classes == 3 and pulled.variant == "atto"
    assert pulled.checkpoint.name == "hf-hub:alice/atto-three"
    for field in ("resolution", "crop_pct", "crop_mode", "interpolation", "mean", "std"):
        assert getattr(pulled.checkpoint, field) == getattr(atto3.checkpoint, field), field
    again = ConvNeXtV2.from_pretrained("alice/atto-three")
    torch.testing.assert_close(logits(again), logits(atto3), atol=0, rtol=0)
    assert again.label_names == LABELS

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    served = len(pushable_hub.tokens)
    offline = cvh.create("hf-hub:alice/atto-three", pretrained=True, progress=False)
    assert len(pushable_hub.tokens) == served  # from the cache: no request at all
    torch.testing.assert_close(logits(offline), logits(atto3), atol=0, rtol=0)


def test_config_and_card_field_by_field(atto3, tmp_path):
    folder = atto3.save_pretrained(tmp_path / "repo", repo_id="alice/atto-three", license="apache-2.0")
    config = json.loads((folder / "config.json").read_text())
    ck = atto3.checkpoint
    assert config == {
        "library_name": "convnextv2-hub", "format": "convnextv2_hub.hub/1", "variant": "atto",
        "depths": [2, 2, 6, 2], "dims": [40, 80, 160, 320], "in_chans": 3, "arch": {}, "num_classes": 3,
        "label_names": LABELS,
        "preprocessing": {"resolution": ck.resolution, "crop_pct": ck.crop_pct, "crop_mode": ck.crop_mode,
                          "interpolation": ck.interpolation, "mean": list(ck.mean), "std": list(ck.std)},
        "license": "apache-2.0", "base_checkpoint": None,
        "weights": {"file": "model.safetensors", "sha256": sha256_file(folder / "model.safetensors"),
                    "size": (folder / "model.safetensors").stat().st_size},
        "peer_formats": {},
    }
    card = huggingface_hub.ModelCard.load(folder / "README.md")
    assert card.data.license == "apache-2.0" and card.data.library_name == "convnextv2-hub"
    assert card.data.pipeline_tag == "image-classification" and "convnextv2" in card.data.tags
    assert card.data.base_model is None  # nothing says it started from released weights
    assert 'cvh.create("hf-hub:alice/atto-three", pretrained=True)' in card.text
    assert "`cat`, `rocket`, `coffee`" in card.text and "chosen by the uploader" in card.text
    local = ConvNeXtV2.from_pretrained(folder)
    torch.testing.assert_close(logits(local), logits(atto3), atol=0, rtol=0)
    # save_pretrained replaces its own folder, never one holding other files.
    atto3.save_pretrained(folder)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="other than a model of ours"):
        atto3.save_pretrained(tmp_path / "photos")
    assert (tmp_path / "photos" / "a.jpg").read_bytes() == b"mine"


def test_ablation_switches_travel_with_the_repo(tmp_path, one_thread):
    model = cvh.create("atto", num_classes=3, block="v1").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = model.save_pretrained(tmp_path / "v1")
    assert json.loads((folder / "config.json").read_text())["arch"] == {"block": "v1"}
    again = ConvNeXtV2.from_pretrained(folder)
    assert again.arch_options() == {"block": "v1"}
    torch.testing.assert_close(logits(again), logits(model), atol=0, rtol=0)


def _code_block(text: str, after: str) -> str:
    """The first ```python block following the line ``after`` in the card."""
    return re.search(re.escape(after) + r".*?```python\n(.*?)```", text, re.DOTALL).group(1)


def test_peer_subfolders_load_in_timm_and_transformers_as_the_card_says(pushable_hub, atto3, tmp_path, monkeypatch):
    atto3.push_to_hub("alice/atto-peers", formats=("ours", "timm", "hf"))
    files = pushable_hub.head("alice/atto-peers")
    assert {"timm/model.safetensors", "hf/config.json", "hf/model.safetensors", "hf/preprocessor_config.json"} <= set(files)
    card = files["README.md"].decode()
    fresh_cache(tmp_path, monkeypatch, "peer_home")
    # timm and transformers call huggingface_hub without an endpoint: the one it read at import applies.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", pushable_hub.url)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        pushable_hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "peer_home" / "hub"))
    expected = logits(atto3)
    scope: dict = {}
    exec(_code_block(card, "With timm:"), scope)  # the card's own lines
    assert (logits(scope["model"]) - expected).abs().max().item() < 1e-5
    scope = {}
    exec(_code_block(card, "With transformers"), scope)
    with torch.no_grad():
        hf_logits = scope["model"].eval()(pixel_values=X).logits
    assert (hf_logits - expected).abs().max().item() < 1e-5
    assert scope["model"].config.id2label == dict(enumerate(LABELS))
    assert scope["processor"].size == {"shortest_edge": atto3.checkpoint.resolution}

    # A push without the peers removes the subfolders the earlier push left (they would hold old weights).
    atto3.push_to_hub("alice/atto-peers")
    assert not any(f.startswith(("timm/", "hf/")) for f in pushable_hub.head("alice/atto-peers"))


def test_interrupted_or_mixed_push_leaves_nothing_a_pull_takes(pushable_hub, atto3, tmp_path, monkeypatch):
    pushable_hub.fail_commits = 1
    with pytest.raises(RuntimeError, match="did not complete"):
        atto3.push_to_hub("alice/new-model")
    assert sorted(pushable_hub.head("alice/new-model")) == [".gitattributes"]
    with pytest.raises(CheckpointError, match=r"holds no model of convnextv2-hub: config.json is missing(.|\n)*push again"):
        cvh.create("hf-hub:alice/new-model", pretrained=True, progress=False)

    first = logits(atto3)
    atto3.push_to_hub("alice/new-model")
    version1 = dict(pushable_hub.head("alice/new-model"))
    with torch.no_grad():
        atto3.head.bias.add_(1.0)
    pushable_hub.fail_commits = 1
    with pytest.raises(RuntimeError, match="did not complete"):
        atto3.push_to_hub("alice/new-model")
    fresh_cache(tmp_path, monkeypatch, "after_failed_push")
    torch.testing.assert_close(logits(cvh.create("hf-hub:alice/new-model", pretrained=True, progress=False)), first,
                               atol=0, rtol=0)

    # A commit pairing version 1's config.json with other weights (as an upload by hand would) is refused,
    # and the refused file does not stay in the cache.
    other = cvh.save_checkpoint(atto3, tmp_path / "other.safetensors").read_bytes()
    pushable_hub._commit("alice/new-model", dict(version1, **{"model.safetensors": other}))
    fresh_cache(tmp_path, monkeypatch, "mixed")
    with pytest.raises(CheckpointError, match="not the file its config.json states(.|\n)*push the model again"):
        cvh.create("hf-hub:alice/new-model", pretrained=True, progress=False)
    assert not [b for b in (tmp_path / "mixed" / "hub").rglob("blobs/*") if b.stat().st_size == len(other)]

    pushable_hub._commit("alice/not-ours", {"config.json": b'{"model_type": "convnextv2"}'})
    with pytest.raises(CheckpointError, match="not a model repo of convnextv2-hub"):
        cvh.create("hf-hub:alice/not-ours", pretrained=True, progress=False)


def test_hub_names_and_licences():
    assert hub_repo_id("hf-hub:alice/x") == "alice/x" and hub_repo_id("hf_hub:alice/x") == "alice/x"
    assert hub_repo_id("hf-hub:timm/convnextv2_tiny.fcmae") is None  # a released checkpoint's timm name
    assert hub_repo_id("tiny") is None
    with pytest.raises(ValueError, match="OWNER/NAME"):
        hub_repo_id("hf-hub:justaname")
    assert choose_license(True, None, "atto.fcmae")[0] == "cc-by-nc-4.0"
    with pytest.raises(ValueError, match="CC BY-NC 4.0"):
        choose_license(True, "mit", "atto.fcmae")
    assert choose_license(False, None)[0] == "mit" and choose_license(False, "apache-2.0")[0] == "apache-2.0"
    assert choose_license(None, None)[0] == "cc-by-nc-4.0"  # not recorded: the released weights' terms assumed
