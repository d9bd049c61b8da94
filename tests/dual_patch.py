"""Test-only patch for diffusers' dual-guided reference pipeline."""


def patch_dual_transformer(monkeypatch) -> None:
    """diffusers 0.42's U-Net passes `encoder_attention_mask` to its transformers, which
    `DualTransformer2DModel.forward` does not accept (TypeError): drop it (it is None here)."""
    from diffusers.models.transformers.dual_transformer_2d import DualTransformer2DModel

    forward = DualTransformer2DModel.forward

    def tolerant_forward(self, *args, encoder_attention_mask=None, **kwargs):
        assert encoder_attention_mask is None
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(DualTransformer2DModel, "forward", tolerant_forward)
