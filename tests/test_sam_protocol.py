"""The backbone protocol: what the trainer, the inferer and the cache use of a backbone."""

from __future__ import annotations

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
