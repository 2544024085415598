import json

import pytest

from florence2 import ConfigError, Florence2Config
from florence2.config import PRESETS

from .conftest import FIXTURES


@pytest.mark.parametrize("name", ["base", "large"])
def test_presets_are_the_real_configs(name):
    d = json.loads((FIXTURES / f"config-{name}.json").read_text())
    assert Florence2Config.from_dict(d) == PRESETS[name]


@pytest.mark.parametrize("name", ["base", "large"])
def test_round_trip_keeps_every_key(name):
    d = json.loads((FIXTURES / f"config-{name}.json").read_text())
    assert Florence2Config.from_dict(d).to_dict() == d


def test_preset_written_reads_back(tmp_path):
    PRESETS["tiny"].to_json(tmp_path / "config.json")
    assert Florence2Config.from_json(tmp_path / "config.json") == PRESETS["tiny"]


def test_image_tokens():
    assert PRESETS["base"].image_tokens(768) == 577
    assert PRESETS["base"].image_tokens(128) == 17


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(model_type="bart"), "model_type"),
    (lambda d: d["vision_config"].update(model_type="vit"), "vision_config.model_type"),
    (lambda d: d["vision_config"].update(num_heads=[4, 8, 16]), "per-stage lists"),
    (lambda d: d["vision_config"].update(num_heads=[3, 8, 16, 32]), "not divisible"),
    (lambda d: d["vision_config"].update(projection_dim=512), "must equal text_config.d_model"),
    (lambda d: d["text_config"].update(d_model=770), "not divisible"),
    (lambda d: d["text_config"].update(encoder_layers=0), "encoder_layers must be positive"),
    (lambda d: d["text_config"].update(dropout=1.5), "dropout must be in"),
    (lambda d: d["text_config"].update(forced_bos_token_id=60000), "outside the vocabulary"),
    (lambda d: d["text_config"].update(activation_function="relu"), "activation_function"),
    (lambda d: d["vision_config"]["image_pos_embed"].update(type="sine"), "image_pos_embed.type"),
    (lambda d: d.pop("text_config"), "text_config"),
])
def test_impossible_values_are_refused(edit, message):
    d = json.loads((FIXTURES / "config-base.json").read_text())
    edit(d)
    with pytest.raises(ConfigError, match=message):
        Florence2Config.from_dict(d)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        Florence2Config.from_name("huge")


def test_bad_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Florence2Config.from_json(tmp_path / "config.json")


def test_a_florence2_config_without_a_vision_section():
    d = json.loads((FIXTURES / "config-base.json").read_text())
    del d["vision_config"]
    with pytest.raises(ConfigError, match=r"config\.json has no 'vision_config' section"):
        Florence2Config.from_dict(d)
