"""Config validation names the bad field; presets equal Gopher Table 1."""

import pytest

from gopher import config


def test_table_one_exactly():
    # (layers, heads, key_size, d_model, max_lr, batch in 2048-token sequences, clip) from
    # Rae et al. 2021, Table 1: 0.25M / 2M / 3M tokens are 128 / 1024 / 1536 sequences.
    table = {
        "44m": (8, 16, 32, 512, 6e-4, 128, 1.0),
        "117m": (12, 12, 64, 768, 6e-4, 128, 1.0),
        "417m": (12, 12, 128, 1536, 2e-4, 128, 1.0),
        "1.4b": (24, 16, 128, 2048, 2e-4, 128, 1.0),
        "7.1b": (32, 32, 128, 4096, 1.2e-4, 1024, 0.25),
        "280b": (80, 128, 128, 16384, 4e-5, 1536, 0.25),
    }
    for name, row in table.items():
        c = config.get_preset(name)
        got = (c.num_layers, c.num_heads, c.key_size, c.d_model, c.max_lr, c.batch_size)
        assert got + (c.clip_norm,) == row, name
        assert c.vocab_size == 32000 and c.seq_len == 2048 and c.ffw_size == 4 * c.d_model
        assert c.batch_tokens == c.batch_size * 2048
        assert c.batch_schedule == (((47_684, 3072),) if name == "280b" else ())


def test_precision_defaults_follow_appendix_c():
    for name in ("44m", "117m", "417m", "1.4b"):
        assert config.get_preset(name).precision == "mixed", name
    for name in ("7.1b", "280b"):
        assert config.get_preset(name).precision == "bf16_sr", name
    for name in ("tiny", "test"):
        assert config.get_preset(name).precision == "fp32", name


def test_experiment_configs_take_the_rows_recipe_and_the_users_overrides():
    from experiments.configs import gopher

    big = gopher.get_config("280b")
    assert (big.train.batch_size, big.train.batch_schedule) == (1536, ((47_684, 3072),))
    assert big.train.precision == "bf16_sr" and big.train.steps == 71_526  # 300B tokens
    small = gopher.get_config("44m")
    assert (small.train.batch_size, small.train.precision) == (128, "mixed")
    assert small.train.steps == 1_144_410  # ceil(300e9 / (128 * 2048))
    for name, batch in (("tiny", 16), ("test", 8)):
        cpu = gopher.get_config(name)
        assert (cpu.train.batch_size, cpu.train.precision, cpu.train.batch_schedule) == (
            batch,
            "fp32",
            (),
        )
    small.train.precision = "fp32"  # what --config.train.precision=fp32 does
    assert config.train_from_dict(dict(small.train)).precision == "fp32"


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
    # Adam has no weight decay: it was ignored without a word.
    with pytest.raises(config.ConfigError, match=r"weight_decay = 0.1 with optimizer = 'adam'"):
        config.TrainConfig(weight_decay=0.1)
    assert config.TrainConfig(weight_decay=0.1, optimizer="adamw").weight_decay == 0.1
    # numpy's generators refused a negative seed only at the first batch, unnamed.
    for seed in (-1, 2**63, 1.5, True):
        with pytest.raises(config.ConfigError, match=r"TrainConfig\.seed = .* --config.train.seed"):
            config.TrainConfig(seed=seed)
    assert config.TrainConfig(seed=2**63 - 1).seed == 2**63 - 1
    # The sinusoids are d_model wide: an odd key size with an even d_model is fine.
    assert config.get_preset("test").replace(d_model=66, num_heads=22, key_size=3).key_size == 3
    with pytest.raises(config.ConfigError, match=r"d_model = 63 must be even"):
        config.get_preset("test").replace(d_model=63, num_heads=7, key_size=9)


def test_unknown_override_field_is_named():
    with pytest.raises(config.ConfigError, match=r"unknown ModelConfig field\(s\) n_layer"):
        config.model_from_dict({"preset": "tiny", "n_layer": 3})


def test_param_count_formula_gives_the_table_column():
    """The presets' counts against Gopher Table 1's parameter column as printed (4 digits);
    tests/test_model.py counts the real parameters' shapes against the same expression."""
    table = {"44m": 43.66e6, "117m": 116.6e6, "417m": 417.3e6, "1.4b": 1.374e9,
             "7.1b": 7.111e9, "280b": 279.7e9}  # fmt: skip
    assert set(table) == set(config.TABLE_PRESETS)
    for name, published in table.items():
        count = config.get_preset(name).param_count_formula()
        assert count == pytest.approx(published, rel=6e-4), name


@pytest.mark.parametrize(
    "field,value",
    [
        ("stop_at_step", -5),
        ("warmup_init_lr", -1.0),
        ("warmup_init_lr", float("nan")),
        ("eps", 0.0),
        ("eps", -1.0),
        ("eps", float("inf")),
        ("weight_decay", -0.1),
        ("peak_flops", -1.0),
        ("watchdog_s", -1.0),
    ],
)
def test_train_fields_out_of_range_name_the_flag(field, value):
    with pytest.raises(
        config.ConfigError, match=rf"TrainConfig\.{field} = .*--config\.train\.{field}"
    ):
        config.TrainConfig(**{field: value})


def test_train_and_data_field_boundaries_are_accepted():
    """Zero means "off" or "none" for these; the defaults pass."""
    config.TrainConfig(stop_at_step=0, warmup_init_lr=0.0, weight_decay=0.0, peak_flops=0.0)
    config.TrainConfig(watchdog_s=0.0, eps=1e-12)
    config.DataConfig(tokenizer_sample_bytes=1)


@pytest.mark.parametrize("value", [0, -1, 1.5])
def test_tokenizer_sample_bytes_must_be_positive(value):
    with pytest.raises(
        config.ConfigError,
        match=r"tokenizer_sample_bytes = .*--config\.data\.tokenizer_sample_bytes",
    ):
        config.DataConfig(tokenizer_sample_bytes=value)


def test_overrides_nothing_reads_are_refused_naming_the_flag_to_use():
    """A model-row recipe field (training reads train.X) or a data field of another source
    would be silently ignored; every preset's defaults still pass."""
    from experiments import common
    from experiments.configs import gopher

    for preset in config.PRESETS:
        common.configs_from_dict(gopher.get_config(preset))
    for name, value in [
        ("batch_size", 4),
        ("precision", "bf16"),
        ("max_lr", 0.5),
        ("clip_norm", 0.5),
        ("batch_schedule", ((10, 16),)),
    ]:
        cfg = gopher.get_config("test")
        cfg.model[name] = value
        with pytest.raises(
            config.ConfigError, match=rf"--config\.model\.{name}=.*--config\.train\.{name}="
        ):
            common.configs_from_dict(cfg)
        cfg.model[name] = getattr(config.get_preset("test"), name)  # the row's own: fine
        common.configs_from_dict(cfg)
    cases = [("paths", "/data/a.txt", "files"), ("mixture", "books=1", "embedded"),
             ("corpus_dir", "/corpus", "embedded")]  # fmt: skip
    for name, value, reader in cases:
        for source in ("stdlib", "files", "embedded"):
            cfg = gopher.get_config("test")
            cfg.data.source, cfg.data[name] = source, value
            if source == "files" and name != "paths":
                cfg.data.paths = "/data/a.txt"
            if source == reader:
                common.configs_from_dict(cfg)
                continue
            with pytest.raises(
                config.ConfigError,
                match=rf"--config\.data\.{name}=.*--config\.data\.source={reader}",
            ):
                common.configs_from_dict(cfg)


@pytest.mark.parametrize(
    "field,value",
    [
        # A non-finite LR or clip norm made every update NaN while the step's loss and
        # gradient norm were finite: the NaN parameters were kept, and the run stopped
        # max_bad_steps later as "diverged" (exit 3) instead of naming the flag.
        ("max_lr", float("nan")),
        ("max_lr", float("inf")),
        ("clip_norm", float("nan")),
        ("clip_norm", float("inf")),
        # Values of the wrong type failed with a TypeError deep inside (or much later).
        ("max_lr", "3e-4"),
        ("b1", "0.9"),
        ("b2", None),
        ("final_lr_ratio", "0.1"),
        ("final_lr_ratio", 0.0),
        ("warmup_steps", True),
        ("steps", 1.5),
        ("batch_size", 16.0),
        ("microbatches", 2.0),
    ],
)
def test_recipe_values_that_would_fail_later_name_the_flag(field, value):
    with pytest.raises(
        config.ConfigError, match=rf"TrainConfig\.{field} = .*--config\.train\.{field}"
    ):
        config.TrainConfig(**{field: value})


def test_recipe_boundaries_are_accepted():
    config.TrainConfig(max_lr=None, clip_norm=None, b1=0.0, b2=0.0, final_lr_ratio=1.0)
    config.TrainConfig(max_lr=1, clip_norm=1e-3, warmup_steps=0, steps=1)
