"""Config validation names the bad field; presets equal Gopher Table 1."""

import pytest

from gopher import config


def test_table_one_exactly():
    # (layers, heads, key_size, d_model, max_lr, batch_tokens, clip) from GOPHER.md.
    table = {
        "44m": (8, 16, 32, 512, 6e-4, 250_000, 1.0),
        "117m": (12, 12, 64, 768, 6e-4, 250_000, 1.0),
        "417m": (12, 12, 128, 1536, 2e-4, 250_000, 1.0),
        "1.4b": (24, 16, 128, 2048, 2e-4, 250_000, 1.0),
        "7.1b": (32, 32, 128, 4096, 1.2e-4, 2_000_000, 0.25),
        "280b": (80, 128, 128, 16384, 4e-5, 3_000_000, 0.25),
    }
    for name, row in table.items():
        c = config.get_preset(name)
        got = (c.num_layers, c.num_heads, c.key_size, c.d_model, c.max_lr, c.batch_tokens)
        assert got + (c.clip_norm,) == row, name
        assert c.vocab_size == 32000 and c.seq_len == 2048 and c.ffw_size == 4 * c.d_model


def test_cpu_presets_keep_the_table_ratios():
    for name in ("tiny", "test"):
        c = config.get_preset(name)
        assert c.num_heads * c.key_size == c.d_model
        assert c.ffw_size == 4 * c.d_model


def test_heads_times_key_size_mismatch_names_the_fields():
    with pytest.raises(config.ConfigError, match=r"num_heads \* key_size.*d_model = 512"):
        config.ModelConfig(8, 16, 64, 512)


@pytest.mark.parametrize("field", ["num_layers", "num_heads", "d_model", "vocab_size"])
def test_non_positive_sizes_name_the_field(field):
    base = config.get_preset("test")
    with pytest.raises(config.ConfigError, match=rf"ModelConfig\.{field} = 0"):
        base.replace(**{field: 0})


def test_unknown_preset_lists_the_choices():
    with pytest.raises(config.ConfigError, match=r"unknown preset '45m'.*44m"):
        config.get_preset("45m")


def test_train_config_errors_name_the_field():
    with pytest.raises(config.ConfigError, match=r"TrainConfig\.steps = -3"):
        config.TrainConfig(steps=-3)
    with pytest.raises(config.ConfigError, match=r"TrainConfig\.optimizer = 'sgd'"):
        config.TrainConfig(optimizer="sgd")
    with pytest.raises(config.ConfigError, match=r"TrainConfig\.precision = 'fp8'"):
        config.TrainConfig(precision="fp8")


def test_unknown_override_field_is_named():
    with pytest.raises(config.ConfigError, match=r"unknown ModelConfig field\(s\) n_layer"):
        config.model_from_dict({"preset": "tiny", "n_layer": 3})


def test_param_count_formula():
    c = config.get_preset("280b")
    assert c.param_count_formula() == 13 * 16384**2 * 80 + 32000 * 16384
