"""The one flow table (vd_jax.flows) and what derives from it: trainer, loaders, sample.py."""

import pytest

from configs import sample as sample_config
from configs import tiny
from vd_jax import flows
from vd_jax.models import unet
from vd_jax.pipelines import sampling
from vd_jax.train import objective


def test_table_rows():
    assert flows.TRAINABLE == (
        "text_to_image", "image_variation", "image_to_text", "text_variation", "dual_guided",
    )  # fmt: skip
    assert flows.IMAGE_FLOWS == ("text_to_image", "image_variation", "dual_guided")
    assert flows.get("image_to_text").parts == ("global", "data/text", "context/image")
    assert flows.get("dual_guided").parts == (
        "global", "data/image", "context/image", "context/text",
    )  # fmt: skip
    # i2t2i runs image->text, then dual-guided: every part of the diffuser.
    assert sorted(flows.get("i2t2i").parts) == sorted(unet.ALL_PARTS)
    assert flows.get("i2t2i").optimus == ("encoder", "decoder")
    for f in flows.FLOWS.values():  # every row names parts the diffuser has
        assert unet.normalize_parts(f.parts) == tuple(p for p in unet.ALL_PARTS if p in f.parts)


def test_names_aliases_and_errors():
    assert flows.get("dual_context") is flows.FLOWS["dual_guided"]
    assert flows.check(["text_variation", "dual_context", "text_to_image", "text_to_image"]) == (
        "text_to_image", "text_variation", "dual_guided",
    )  # fmt: skip
    with pytest.raises(ValueError, match="unknown flow 'text2image'; choose from"):
        flows.check(["text2image"])
    with pytest.raises(ValueError, match="unknown trainable flow 'i2t2i'"):
        flows.check(["i2t2i"], trainable=True)
    with pytest.raises(ValueError, match="no flows given"):
        flows.check([])
    assert flows.entry({"dual_context": 3}, "dual_guided") == 3
    with pytest.raises(KeyError, match="no entry for flow 'image_variation'"):
        flows.entry({"text_to_image": 1}, "image_variation")


def test_needed_inputs():
    assert flows.needed_inputs(["text_to_image"]) == {"image_latent", "text_context"}
    assert flows.needed_inputs(["image_to_text", "dual_guided"]) == {
        "text_latent", "image_latent", "image_context", "text_context",
    }  # fmt: skip


def test_trainer_takes_the_table_and_its_aliases():
    c = tiny.get_config("flows=dual_context+text_to_image")
    assert objective.trained_flows(c) == ("text_to_image", "dual_guided")
    c = tiny.get_config("flows=all")
    assert objective.trained_flows(c) == flows.TRAINABLE


def test_sample_config_validation_follows_the_table():
    def config(name, **kw):
        c = sample_config.get_config(name)
        c.weights = "somewhere"
        c.update(kw)
        return c

    with pytest.raises(sampling.ConfigError, match="config.flow='nope': choose one of"):
        sampling.validate(config("text_to_image", flow="nope"))
    for name, f in flows.FLOWS.items():
        if f.prompt and not f.image:
            with pytest.raises(sampling.ConfigError, match="config.prompt"):
                sampling.validate(config(name))
        if f.image:
            with pytest.raises(sampling.ConfigError, match="config.image"):
                sampling.validate(config(name, prompt="a cat"))
    sampling.validate(config("text_to_image", prompt="a cat"))  # complete: no error
