"""create(pretrained=True) end to end, offline: a loopback Hub serving a timm-layout file (what the real
timm/convnextv2_* repos hold), then the Hub cache in offline mode, then the authors'-URL fallback."""
import io
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save

import convnextv2_hub as cvh
import convnextv2_hub.models.factory as hub
from convnextv2_hub.checkpoints.io import to_ours
from conftest import file_responder, hub_responder

import timm


@pytest.fixture(scope="module")
def timm_atto():
    torch.manual_seed(0)
    model = timm.create_model("convnextv2_atto", pretrained=False).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # GRN gamma/beta included: zero would hide GRN bugs
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        return model.state_dict(), x, model(x)


def test_pretrained_from_hub_then_offline_cache(hf_env, servers, timm_atto, monkeypatch):
    sd, x, expected = timm_atto
    ckpt = cvh.get_checkpoint("atto")
    hub_server = servers(hub_responder({(ckpt.hf_hub_id, ckpt.hf_hub_filename): save(sd)}))
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)

    model = cvh.create("atto", pretrained=True, progress=False).eval()
    with torch.no_grad():
        delta = (model(x) - expected).abs().max().item()
    assert delta <= 1e-4, delta
    assert any(method == "GET" for method, _ in hub_server.requests)

    seen = len(hub_server.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = cvh.create("atto", pretrained=True, progress=False).eval()
    assert len(hub_server.requests) == seen  # served from the cache, no request at all
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


def test_pretrained_falls_back_to_authors_url(hf_env, servers, timm_atto, monkeypatch):
    sd, x, expected = timm_atto
    buf = io.BytesIO()
    torch.save({"model": to_ours(sd)}, buf)  # the authors' .pt layout: {'model': dense state dict}
    authors = servers(file_responder({"/convnextv2_atto_1k_224_ema.pt": buf.getvalue()}))
    empty_hub = servers(hub_responder({}))  # every repo 404s
    monkeypatch.setenv("HF_ENDPOINT", empty_hub.url)
    entry = replace(cvh.get_checkpoint("atto"), url=f"{authors.url}/convnextv2_atto_1k_224_ema.pt")
    monkeypatch.setattr(hub, "get_checkpoint", lambda name: entry)

    model = cvh.create("atto", pretrained=True, progress=False).eval()
    with torch.no_grad():
        assert (model(x) - expected).abs().max().item() <= 1e-4
    assert [m for m, _ in authors.requests].count("GET") == 1


def test_pretrained_unreachable_says_what_to_do(hf_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError) as err:
        cvh.create("femto", pretrained=True, progress=False)
    msg = str(err.value)
    assert "femto.fcmae_ft_in1k" in msg and "checkpoint_path=" in msg and "HF_HUB_OFFLINE" in msg
