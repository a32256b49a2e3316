import json

import pytest

from simone.cli import main
from simone.config import ConfigError, PRESETS, apply_overrides, from_dict, load_config, preset, save_config


def test_presets_are_complete_and_distinct():
    assert {"tiny", "cpu", "h200", "h100"} <= set(PRESETS)
    h200 = preset("h200")
    # the original design's full single-GPU run
    assert (h200.tokenizer.vocab_size, h200.model.dim, h200.model.n_layers) == (32000, 768, 12)
    assert (h200.train.batch_size, h200.train.grad_accum, h200.train.lr) == (12, 4, 3e-4)
    assert (h200.train.num_epochs, h200.train.min_epochs, h200.train.patience) == (7, 6, 2)
    assert preset("tiny").model.dim < preset("cpu").model.dim < h200.model.dim
    assert preset("cpu-gpt2").model.arch == "gpt2"


def test_overrides_are_typed():
    cfg = apply_overrides(preset("tiny"), ["train.lr=1e-3", "model.n_kv_heads=2", "train.compile=true",
                                           "train.max_steps=none", "curate.domain_relax={\"a\": 0.5}"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.model.n_kv_heads == 2
    assert cfg.train.compile is True
    assert cfg.train.max_steps is None
    assert cfg.curate.domain_relax == {"a": 0.5}


@pytest.mark.parametrize("bad", ["train.nope=1", "nope.lr=1", "train.lr=abc", "train.lr", "lr=1",
                                 "train.compile=maybe", "train.batch_size=none"])
def test_bad_overrides_raise_config_error(bad):
    with pytest.raises(ConfigError):
        apply_overrides(preset("tiny"), [bad])


def test_saved_config_round_trips(tmp_path):
    cfg = apply_overrides(preset("cpu"), ["train.lr=0.01", "model.arch=gpt2"])
    save_config(cfg, tmp_path / "c.json")
    again = load_config(tmp_path / "c.json")
    assert again == cfg
    # a partial config starts from its preset
    partial = from_dict({"preset": "tiny", "train": {"seed": 7}})
    assert partial.train.seed == 7 and partial.model.dim == preset("tiny").model.dim


def test_bad_config_file_names_the_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json"):
        load_config(p)
    p.write_text(json.dumps({"train": {"lr": "fast"}}))
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(p)


def test_config_command_prints_preset_with_legacy_flags(capsys):
    assert main(["config", "--preset", "h200", "--learning_rate", "0.001", "--num_layers", "6",
                 "--gradient_accumulation_steps", "8", "--set", "train.seed=5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["preset"] == "h200"
    assert out["train"]["lr"] == 0.001 and out["model"]["n_layers"] == 6
    assert out["train"]["grad_accum"] == 8 and out["train"]["seed"] == 5


@pytest.mark.parametrize("argv", [["run", "--bogus-flag"], ["config", "--preset", "huge"],
                                  ["config", "--set", "train.lr=x"], ["nosuchverb"]])
def test_user_errors_are_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_passes_the_range_checks(name):
    from simone.config import check_model_ranges

    check_model_ranges(preset(name).model)
    from_dict(preset(name).to_dict())


@pytest.mark.parametrize("field, value, message", [
    ("n_layers", 10**8, r"model.n_layers=100000000: out of range \(expected 1..1024\)"),
    ("max_seq_len", 2**31, r"model.max_seq_len=2147483648: out of range"),
    ("vocab_size", 0, r"model.vocab_size=0: out of range"),
    ("dim", 10**7, r"model.dim=10000000: out of range"),
    ("n_heads", 3, r"model.dim=64: not divisible by model.n_heads=3"),
    ("n_kv_heads", 3, r"model.n_heads=4: not divisible by model.n_kv_heads=3"),
    ("dropout", 1.5, r"model.dropout=1.5: out of range"),
    ("norm_eps", -1.0, r"model.norm_eps=-1.0: out of range"),
    ("policy_layer", 7, r"model.policy_layer=7: not a block index"),
])
def test_a_downloaded_config_out_of_range_is_refused_before_anything_is_built(tmp_path, field, value, message):
    d = preset("tiny").to_dict()
    d["model"][field] = value
    with pytest.raises(ConfigError, match=message):
        from_dict(d)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "config.json")


@pytest.mark.parametrize("key", ["data.control_token_prob", "data.control_window_prob"])
def test_a_share_out_of_range_is_refused_where_it_is_set(key, tmp_path):
    with pytest.raises(ConfigError, match=rf"{key}=1.5: out of range \(a share: expected 0..1\)"):
        apply_overrides(preset("tiny"), [f"{key}=1.5"])
    with pytest.raises(ConfigError, match=rf"{key}=-0.1: out of range"):
        apply_overrides(preset("tiny"), [f"{key}=-0.1"])
    assert getattr(apply_overrides(preset("tiny"), [f"{key}=0.5"]).data, key.split(".")[1]) == 0.5
    section, field = key.split(".")
    (tmp_path / "c.json").write_text(json.dumps({"preset": "tiny", section: {field: 2}}))
    with pytest.raises(ConfigError, match=rf"c.json: {key}=2.0: out of range"):
        load_config(tmp_path / "c.json")
