"""torch.hub entry points: ``torch.hub.load("<owner>/convnextv2-hub", "convnextv2_tiny", pretrained=True)``."""
dependencies = ["torch", "torchvision", "huggingface_hub", "safetensors", "PIL"]

from convnextv2_hub.models.factory import create as _create  # noqa: E402


def _entry(variant: str):
    def fn(pretrained: bool = False, tag: str = "", **kwargs):
        return _create(f"{variant}.{tag}" if tag else variant, pretrained=pretrained, **kwargs)

    fn.__name__ = f"convnextv2_{variant}"
    fn.__doc__ = (f"ConvNeXt V2-{variant.capitalize()}. pretrained=True loads the default checkpoint, or "
                  f"`tag=` (e.g. 'fcmae_ft_in1k'); other kwargs go to convnextv2_hub.create.")
    return fn


convnextv2_atto = _entry("atto")
convnextv2_femto = _entry("femto")
convnextv2_pico = _entry("pico")
convnextv2_nano = _entry("nano")
convnextv2_tiny = _entry("tiny")
convnextv2_base = _entry("base")
convnextv2_large = _entry("large")
convnextv2_huge = _entry("huge")
