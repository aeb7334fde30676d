"""FCMAE's ablation switches (paper section 3, Table 1, Fig. 8): the default is today's model, the dense
(leaking) encoder masking, the UNet / Transformer decoders, any mask ratio, saving and loading."""
import pytest
import torch

from conftest import normalised_photos
from convnextv2_hub.models.convnextv2 import convnextv2
from convnextv2_hub.models.decoders import DECODERS, decoder_from_keys, sincos_2d
from convnextv2_hub.models.fcmae import ENCODER_MASKINGS, FCMAE, gen_random_mask
from convnextv2_hub.train import config as C

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest


@pytest.fixture(scope="module")
def encoder():
    """One Atto encoder, shared by the decoders under test (FCMAE uses a given encoder as it is)."""
    torch.manual_seed(0)
    return convnextv2("atto", num_classes=0)


def _mask(n: int, cells: int, masked: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([(torch.randperm(cells, generator=g) < masked).float() for _ in range(n)])


def test_defaults_are_the_authors_fcmae():
    # The authors' main_pretrain.py state-dict layout of the decoder side (Atto encoder, width 512, one
    # ConvNeXt V2 block): the keys of their checkpoints, which from_checkpoint loads one to one.
    torch.manual_seed(0)
    m = FCMAE("atto")
    decoder_side = {k: tuple(v.shape) for k, v in m.state_dict().items() if not k.startswith("encoder.")}
    assert decoder_side == {
        "proj.weight": (512, 320, 1, 1), "proj.bias": (512,), "mask_token": (1, 512, 1, 1),
        "decoder.0.dwconv.weight": (512, 1, 7, 7), "decoder.0.dwconv.bias": (512,),
        "decoder.0.norm.weight": (512,), "decoder.0.norm.bias": (512,),
        "decoder.0.pwconv1.weight": (2048, 512), "decoder.0.pwconv1.bias": (2048,),
        "decoder.0.grn.gamma": (1, 1, 1, 2048), "decoder.0.grn.beta": (1, 1, 1, 2048),
        "decoder.0.pwconv2.weight": (512, 2048), "decoder.0.pwconv2.bias": (512,),
        "pred.weight": (3072, 512, 1, 1), "pred.bias": (3072,),
    }
    assert set(m.encoder.state_dict()) == set(convnextv2("atto", num_classes=0).state_dict())
    assert (m.encoder_masking, m.decoder_type, m.sparse) == ("sparse", "convnext", True)
    assert m.config()["decoder"] == "convnext" and m.config()["encoder_masking"] == "sparse"
    # Naming the defaults builds the same model: same random draws in the same order, same weights.
    torch.manual_seed(0)
    named = FCMAE("atto", encoder_masking="sparse", decoder="convnext", decoder_dim=512, decoder_depth=1)
    for k, v in m.state_dict().items():
        assert torch.equal(v, named.state_dict()[k]), k


def test_config_choices_match_the_model():
    cfg = C.defaults()
    for k, allowed in (("decoder", DECODERS), ("encoder_masking", ENCODER_MASKINGS)):
        for v in allowed:
            C.validate(dict(cfg, **{k: v}))
        with pytest.raises(C.ConfigError, match=f"{k} must be one of"):
            C.validate(dict(cfg, **{k: "other"}))


def test_dense_encoder_masking_zeroes_the_input_and_leaks_the_mask(encoder):
    torch.manual_seed(1)
    x = normalised_photos(64)[:1]
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0]])  # top-left 32x32 patch masked
    changed = x.clone()
    changed[:, :, :32, :32] = torch.randn(1, 3, 32, 32)  # other content in the masked patch only
    dense = FCMAE(encoder, decoder_dim=32, encoder_masking="dense").eval()
    with torch.no_grad():
        out = dense.forward_encoder(x, mask)
        # The encoder is the plain dense network on the image with the masked patch zeroed ...
        zeroed = x.clone()
        zeroed[:, :, :32, :32] = 0
        assert torch.equal(out, dense.encoder.forward_features(zeroed))
        # ... so the masked patch's content never reaches it,
        assert torch.equal(out, dense.forward_encoder(changed, mask))
        # but the zeros do: the masked cell is not zero, and a visible cell's features differ from
        # the masked computation's (same weights), which keeps masked positions out of every conv.
        sparse = FCMAE(dense.encoder, decoder_dim=32).eval()
        ref = sparse.forward_encoder(x, mask)
        assert out[0, :, 0, 0].abs().sum() > 0 and torch.equal(ref[0, :, 0, 0], torch.zeros(320))
        assert not torch.allclose(out[0, :, 0, 1], ref[0, :, 0, 1], atol=1e-4)
    with pytest.raises(ValueError, match="encoder_masking must be one of"):
        FCMAE(encoder, encoder_masking="leaky")
    with pytest.raises(ValueError, match="leave sparse at None"):
        FCMAE(encoder, encoder_masking="dense", sparse=True)


def test_unet_skips_read_the_encoder_stages_and_noskip_does_not(encoder):
    torch.manual_seed(2)
    x, mask = normalised_photos(64)[:2], _mask(2, 4, 2)
    for kind, uses_skips in (("unet", True), ("unet_noskip", False)):
        m = FCMAE(encoder, decoder=kind, decoder_dim=64).eval()
        with torch.no_grad():
            stages = m.forward_encoder_stages(x, mask)
            assert [s.shape[-1] for s in stages] == [16, 8, 4, 2]
            pred = m.forward_decoder(stages, mask)
            no_stage0 = m.forward_decoder([torch.zeros_like(stages[0])] + stages[1:], mask)
        assert pred.shape == (2, 4, 3072)
        assert torch.equal(pred, no_stage0) is not uses_skips, kind
        assert torch.equal(m(x, mask=mask)[1], pred)


def test_transformer_decoder_tells_positions_apart(encoder):
    # Every cell masked: the decoder's input is the same mask token everywhere, so only the position
    # embedding can make the four predictions differ.
    torch.manual_seed(3)
    m = FCMAE(encoder, decoder="transformer", decoder_dim=32, decoder_depth=2).eval()
    with torch.no_grad():
        pred = m(normalised_photos(64)[:1], mask=torch.ones(1, 4))[1][0]
    assert all(not torch.allclose(pred[i], pred[j]) for i in range(4) for j in range(i))
    pe = sincos_2d(32, 2, 3)
    assert pe.shape == (6, 32) and torch.equal(pe[0], torch.tensor([0.0] * 8 + [1.0] * 8 + [0.0] * 8 + [1.0] * 8))
    assert torch.equal(pe[1, :16], pe[0, :16]) and not torch.equal(pe[3, :16], pe[0, :16])  # rows, then columns
    with pytest.raises(ValueError, match="multiple of 4"):
        FCMAE(encoder, decoder="transformer", decoder_dim=30)


def test_any_mask_ratio_in_the_open_interval_trains(encoder):
    torch.manual_seed(4)
    x = normalised_photos(96)[:2]  # 3x3 = 9 patches; at 0.99 every one is masked
    for ratio in (0.05, 0.3, 0.6, 0.99):
        m = FCMAE(encoder, mask_ratio=ratio, decoder_dim=32)
        loss, _, mask = m(x)
        loss.backward()
        assert torch.isfinite(loss) and loss > 0, ratio
        assert mask.sum(1).tolist() == [9 - int(9 * (1 - ratio))] * 2
        assert m.config()["mask_ratio"] == ratio
        assert gen_random_mask(1, 7, 7, ratio).sum() == 49 - int(49 * (1 - ratio))


def test_decoder_type_and_depth_are_read_back_from_the_keys(encoder):
    for kind, depth in [(k, 2) for k in DECODERS] + [("unet_noskip", 0), ("transformer", 0)]:
        sd = FCMAE(encoder, decoder=kind, decoder_dim=32, decoder_depth=depth).state_dict()
        assert decoder_from_keys(sd) == (kind, depth)
        again = FCMAE.from_checkpoint(sd)  # a bare state dict: no metadata to read
        assert (again.decoder_type, again.decoder_depth, again.decoder_dim) == (kind, depth, 32)
