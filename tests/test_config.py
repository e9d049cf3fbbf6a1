"""Config loading: strict keys and types, overrides, and the one-line error table."""

from __future__ import annotations

import copy

import pytest

from lit_modules.config import load_run_config, parse_override
from lit_modules.config_errors import ConfigError

from .conftest import SPECS, TINY


def _cfg(**changes):
    data = copy.deepcopy(TINY["gpt"])
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return data


# field that must be named, a fragment of the value, a fragment of what is allowed
BAD_CONFIGS = [
    ({"model.colour": "red"}, "model.colour", "unknown key"),
    ({"masking.p_bw": 1.5}, "masking.p_bw", "[0, 1]"),
    ({"masking.p_bw": -0.1}, "masking.p_bw", "[0, 1]"),
    ({"model.depth": 0}, "model.depth", ">= 1"),
    ({"model.width": 30, "model.heads": 4}, "model.width", "multiple of heads"),
    ({"model.depth": "four"}, "model.depth", "int"),
    ({"optim.lr": -1.0}, "optim.lr", "> 0"),
    ({"model.name": "gtp"}, "model.name", "gpt"),
    ({"masking.name": "nope"}, "masking.name", "causal-lm"),
    ({"data.name": "wikitext-3"}, "data.name", "wikitext-2"),
]


@pytest.mark.parametrize("changes,field,allowed", BAD_CONFIGS, ids=[f[1] for f in BAD_CONFIGS])
def test_bad_config_one_line_error(changes, field, allowed):
    with pytest.raises(ConfigError) as info:
        load_run_config(_cfg(**changes))
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert field in msg, msg
    assert allowed in msg, msg
    value = next(iter(changes.values())) if len(changes) == 1 else changes[field]
    assert str(value) in msg, msg


def test_unknown_top_level_section_names_key_and_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 0\nmodle: {depth: 2}\n")
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    msg = str(info.value)
    assert "modle" in msg and "run.yaml" in msg and "\n" not in msg


def test_override_error_names_the_flag():
    with pytest.raises(ConfigError) as info:
        load_run_config(_cfg(), ["model.depht=3"])
    assert "model.depht" in str(info.value)
    with pytest.raises(ConfigError):
        parse_override("model.depth")  # no '='


def test_overrides_are_typed():
    cfg = load_run_config(_cfg(), ["model.depth=3", "masking.p_bw=0.05", "trainer.progress_bar=false"])
    assert cfg.model.depth == 3 and cfg.masking.p_bw == 0.05 and cfg.trainer.progress_bar is False


def test_hash_is_stable_and_sensitive():
    a, b = load_run_config(_cfg()), load_run_config(_cfg())
    assert a.hash() == b.hash()
    assert load_run_config(_cfg(**{"masking.p_bw": 0.1})).hash() != a.hash()


def test_flat_names_are_the_swept_dotted_paths():
    flat = load_run_config(_cfg()).flat()
    for name in ("model.depth", "model.width", "model.heads", "model.block_size", "masking.p_bw", "seed"):
        assert name in flat


def test_missing_corpus_file(tmp_path):
    from lit_modules.paths import Workspace
    from lit_modules.run import build_datamodule

    ws = Workspace.resolve(tmp_path / "out", tmp_path / "empty-data")
    with pytest.raises(ConfigError) as info:
        build_datamodule(load_run_config(_cfg()), ws)
    msg = str(info.value)
    assert "\n" not in msg and "wiki.valid.raw" in msg and "MASKLAB_DATA_DIR" in msg


def test_block_size_larger_than_corpus(tmp_path, session_cache, data_dir):
    from lit_modules.paths import Workspace
    from lit_modules.run import build_datamodule

    data = tmp_path / "data"
    data.mkdir()
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text()[:4000]  # ~4k tokens at most
    (data / "small.txt").write_text(text)
    ws = Workspace.resolve(session_cache, data)
    cfg = _cfg(**{"data.name": "text", "data.path": "small.txt", "data.vocab_size": 64, "model.block_size": 8192})
    with pytest.raises(ConfigError) as info:
        build_datamodule(load_run_config(cfg), ws)
    msg = str(info.value)
    assert "model.block_size" in msg and "8192" in msg and "\n" not in msg


@pytest.mark.parametrize("path", sorted(SPECS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_validate(path):
    """Every shipped YAML loads: run configs as run configs, study specs as studies."""
    import yaml

    raw = yaml.safe_load(path.read_text())
    if "fixed" in raw or "grid" in raw or "search" in raw:
        from studies.spec import load_spec

        load_spec(path)
    else:
        load_run_config(path)


def test_the_old_video_family_name_names_the_new_ones():
    data = copy.deepcopy(TINY["video-mae"])
    data["model"]["name"] = "video"
    with pytest.raises(ConfigError) as info:
        load_run_config(data)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("model.name = 'video'")
    assert "video-mae" in msg and "maskvit" in msg


@pytest.mark.parametrize("field, value, allowed", [
    ("optim.schedule", "linear", "cosine, constant"),
    ("optim.name", "sgd", "adamw"),
    ("trainer.precision", "fp8", "bf16-mixed"),
    ("trainer.accelerator", "tpu", "cuda"),
    ("data.tokenizer", "wordpiece", "bpe, unigram"),
])
def test_literal_choices_are_checked_by_the_loader(field, value, allowed):
    with pytest.raises(ConfigError) as info:
        load_run_config(_cfg(**{field: value}))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{field} = {value!r}: allowed: ") and allowed in msg


def test_model_stage_is_a_literal_choice():
    data = copy.deepcopy(TINY["video-mae"])
    data["model"]["stage"] = "three-stage"
    with pytest.raises(ConfigError) as info:
        load_run_config(data)
    assert str(info.value).startswith("model.stage = 'three-stage': allowed: pretrain, autoregressive, two-stage")


@pytest.mark.parametrize("model", sorted(TINY))
def test_a_masking_of_another_batch_kind_is_refused_naming_those_that_fit(model):
    """Compatibility is derived: a masking fits a model when it accepts the batch kind
    the model consumes; any other is refused with the ones that fit."""
    from lit_modules.masking.batches import kind_name
    from lit_modules.model_configs import maskings_for
    from lit_modules.registry import MASKINGS, MODELS

    consumes = MODELS.config(model).consumes
    fits = maskings_for(consumes)
    assert TINY[model]["masking"]["name"] in fits
    for other in MASKINGS.names():
        if other in fits:
            continue
        data = copy.deepcopy(TINY[model])
        data["masking"] = {"name": other}
        with pytest.raises(ConfigError) as info:
            load_run_config(data)
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(f"masking.name = '{other}'"), msg
        assert kind_name(consumes) in msg and ", ".join(fits) in msg
