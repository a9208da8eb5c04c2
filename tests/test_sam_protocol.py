"""The backbone protocol: what the trainer, the inferer and the cache use of a backbone."""

from __future__ import annotations

import copy

from torch import nn

from ambisam.sam import ImageBackbone, SamBackbone


def test_sam_backbone_is_an_image_backbone(litemedsam):
    assert isinstance(litemedsam, SamBackbone)
    assert isinstance(litemedsam, ImageBackbone)


def test_a_module_without_the_interface_is_not_one():
    class EncoderOnly(nn.Module):
        name = "encoder-only"
        image_size = 64
        mask_size = (16, 16)

        def __init__(self):
            super().__init__()
            self.image_encoder = nn.Conv2d(3, 8, 4, stride=4)

        def encode(self, images):
            return self.image_encoder(images)

    partial = EncoderOnly()
    assert not isinstance(partial, ImageBackbone)  # no boxes_to_input, no postprocess
    partial.boxes_to_input = lambda boxes, image_size: boxes
    partial.postprocess = lambda logits, image_size: logits
    assert isinstance(partial, ImageBackbone)


def test_the_unet_grid_backbone_is_an_image_backbone_too():
    from ambisam.networks import ImageGridBackbone

    assert isinstance(ImageGridBackbone(32), ImageBackbone)


def test_every_method_network_states_its_backbone_through_the_protocol(litemedsam):
    """The trainer and the inferer read a method's backbone through the protocol only: every registered method's
    backbone satisfies it."""
    from ambisam.registry import method_registry

    for name, spec in method_registry.items():
        try:
            cls = spec.network_class
        except Exception:  # noqa: BLE001 - a method whose network is not written yet
            continue
        # a copy: a method may adapt the backbone it is given in place (P2SAM's mask tokens and LoRA)
        net = spec.build(image_size=32) if name == "prob_unet" else spec.build(backbone=copy.deepcopy(litemedsam))
        assert isinstance(net.backbone, ImageBackbone), name
        assert cls.capabilities.needs_prompt in (True, False)
