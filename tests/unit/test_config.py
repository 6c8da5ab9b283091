"""Typed config loading: unknown keys, wrong types, nested configs, overrides."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from metastone_lab.config import check, flatten, from_dict, load_yaml, parse_override
from metastone_lab.errors import ConfigError, UnknownNameError
from metastone_lab.registry import Registry


@dataclass
class Inner:
    lr: float = 1e-3
    r: int = 8


@dataclass
class Outer:
    name: str = "x"
    k: int = 8
    mode: Literal["joint", "head_only"] = "joint"
    inner: Inner = field(default_factory=Inner)
    layers: list[int] = field(default_factory=lambda: [1, 2])
    note: Optional[str] = None

    def __post_init__(self):
        check(self.k >= 1, f"k must be >= 1, got {self.k}; use k=1 for a single sample")


def test_unknown_key_names_key_and_suggests():
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, {"kk": 3})
    assert "'kk'" in str(e.value) and "Did you mean 'k'" in str(e.value)


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"Outer\.k: expected an integer, got str"):
        from_dict(Outer, {"k": "eight"})


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="Outer.k"):
        from_dict(Outer, {"k": True})


def test_int_widens_to_float_and_nested_mapping():
    cfg = from_dict(Outer, {"inner": {"lr": 1}})
    assert cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)


def test_nested_unknown_key_has_path():
    with pytest.raises(ConfigError, match=r"Outer\.inner: unknown key 'rr'"):
        from_dict(Outer, {"inner": {"rr": 1}})


def test_literal_lists_choices():
    with pytest.raises(ConfigError, match="head_only"):
        from_dict(Outer, {"mode": "sft"})


def test_range_check_in_post_init():
    with pytest.raises(ConfigError, match="k must be >= 1"):
        from_dict(Outer, {"k": 0})


def test_list_items_are_checked():
    with pytest.raises(ConfigError, match=r"Outer\.layers\[1\]"):
        from_dict(Outer, {"layers": [1, "a"]})


def test_optional_accepts_none():
    assert from_dict(Outer, {"note": None}).note is None


def test_flatten_uses_dotted_keys():
    flat = flatten(from_dict(Outer, {}))
    assert flat["inner.lr"] == 1e-3 and flat["k"] == 8


def test_parse_override_reads_yaml_scalars():
    assert parse_override("k=8") == ("k", 8)
    assert parse_override("name=abc") == ("name", "abc")
    assert parse_override("lr=3e-4") == ("lr", 3e-4)   # YAML 1.1 alone would give "3e-4"
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("k8")


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        load_yaml(empty)
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"a: \xff\xfe\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_yaml(bad)


def test_registry_unknown_name_lists_valid():
    reg: Registry = Registry("widget")
    reg.register("a")(1)
    reg.register("b")(2)
    with pytest.raises(UnknownNameError, match="unknown widget 'c'; choose one of: a, b"):
        reg.get("c")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(3)


# ------------------------------------------- step options are checked when a config loads
@pytest.mark.parametrize("kw, match", [
    (dict(segmenter_options={"conclusoin": True}), "has no option 'conclusoin'.*conclusion"),
    (dict(segmenter_options={"conclusion": "yes"}), "conclusion must be true or false"),
    (dict(train={"read_at": "step_token"}), "set read_at at the top level"),
    (dict(train={"segmenter_options": {"conclusion": False}}), "segmenter_options"),
    (dict(train={"head_lr_typo": 1.0}), "unknown key 'head_lr_typo'"),
])
def test_study_config_rejects_bad_step_options_and_train_keys_at_load(kw, match):
    from metastone_lab.study import StudyConfig

    with pytest.raises(ConfigError, match=match):
        StudyConfig(**kw)


def test_generate_and_probe_configs_check_step_options_at_load():
    from metastone_lab.errors import UnknownNameError
    from metastone_lab.generate_config import GenerateConfig
    from metastone_lab.probe import ProbeConfig

    with pytest.raises(ConfigError, match="'regex' has no option 'patern'.*'pattern'"):
        GenerateConfig(segmenter="regex", segmenter_options={"patern": "x"})
    assert GenerateConfig(segmenter="regex", segmenter_options={"pattern": "x"}).k == 8
    with pytest.raises(UnknownNameError, match="paragraph"):
        ProbeConfig(segmenter="paragraf")


def test_generate_config_continuous_batching_is_a_bool():
    from metastone_lab.generate_config import GenerateConfig

    assert GenerateConfig().continuous_batching is True
    assert from_dict(GenerateConfig, {"continuous_batching": False}).continuous_batching is False
    with pytest.raises(ConfigError, match="continuous_batching"):
        from_dict(GenerateConfig, {"continuous_batching": "yes"})
    with pytest.raises(ConfigError, match="continuous_batching"):
        GenerateConfig(continuous_batching=1)


def test_train_config_checks_step_options_at_load():
    from metastone_lab.train import TrainConfig

    with pytest.raises(ConfigError, match="'fixed' has no option 'size'.*'n'"):
        from_dict(TrainConfig, {"segmenter": "fixed", "segmenter_options": {"size": 4}})
    assert from_dict(TrainConfig, {"segmenter": "fixed", "segmenter_options": {"n": 4}}).n >= 1


# --------------------------------------------------------------- the config tree
def _composers():
    from metastone_lab.generate_config import GenerateConfig
    from metastone_lab.probe import ProbeConfig
    from metastone_lab.study import StudyConfig
    from metastone_lab.train import TrainConfig

    return [StudyConfig, TrainConfig, GenerateConfig, ProbeConfig]


def test_each_shared_knob_is_a_field_of_exactly_one_dataclass():
    import dataclasses

    from metastone_lab.config_tree import SUBCONFIGS

    owners: dict[str, list[str]] = {}
    for cls in _composers() + list(SUBCONFIGS.values()):
        for f in dataclasses.fields(cls):
            owners.setdefault(f.name, []).append(cls.__name__)
    for sub in SUBCONFIGS.values():
        for f in dataclasses.fields(sub):
            assert owners[f.name] == [sub.__name__], (
                f"{f.name!r} is declared in {owners[f.name]}; declare it once, in "
                f"{sub.__name__}, and compose that")
    for cls in _composers():  # every composer holds a sub-config under the same name
        for f in dataclasses.fields(cls):
            if f.name in SUBCONFIGS:
                assert f.type in (SUBCONFIGS[f.name], SUBCONFIGS[f.name].__name__)


def test_flat_names_are_derived_from_the_sub_configs():
    from metastone_lab.config import flat_names
    from metastone_lab.study import SHARED_WITH_TRAINING, StudyConfig

    flat = flat_names(StudyConfig)
    assert flat["temperature"] == "sampling" and flat["segmenter"] == "segmentation"
    assert flat["backbone"] == "workload" and "k_max" not in flat
    assert {"segmenter", "aggregator", "task", "prompt_format"} <= set(SHARED_WITH_TRAINING)
    assert "temperature" not in SHARED_WITH_TRAINING   # training may sample differently


def test_flat_and_nested_input_load_the_same_config():
    from metastone_lab.config import to_dict
    from metastone_lab.study import StudyConfig
    from metastone_lab.train import TrainConfig

    flat = from_dict(StudyConfig, {"temperature": 1.2, "segmenter_options": {"conclusion": True},
                                   "task": "expr", "seed": 3})
    nested = from_dict(StudyConfig, {"sampling": {"temperature": 1.2, "seed": 3},
                                     "segmentation": {"segmenter_options": {"conclusion": True}},
                                     "workload": {"task": "expr"}})
    assert flat == nested == StudyConfig(temperature=1.2, seed=3, task="expr",
                                         segmenter_options={"conclusion": True})
    assert flat.temperature == flat.sampling.temperature == 1.2
    assert to_dict(flat)["temperature"] == 1.2 and "sampling" not in to_dict(flat)
    assert to_dict(flat, nested=True)["sampling"]["temperature"] == 1.2
    # a flat key beside a nested mapping of the same sub-config: both apply
    both = from_dict(StudyConfig, {"sampling": {"seed": 3}, "temperature": 1.2})
    assert (both.seed, both.temperature) == (3, 1.2)
    # the study passes its sub-configs down, copied
    tcfg = flat.train_config()
    assert (tcfg.temperature, tcfg.seed, tcfg.task) == (1.2, 3, "expr")
    assert tcfg.segmentation == flat.segmentation and tcfg.segmentation is not flat.segmentation
    gcfg = flat.generate_config(4, seed_offset=7)
    assert (gcfg.temperature, gcfg.seed, gcfg.segmenter_options) == (1.2, 10, {"conclusion": True})
    assert from_dict(TrainConfig, {"max_new_tokens": 32}).sampling.max_new_tokens == 32


def test_setting_a_flat_name_writes_the_sub_config():
    from metastone_lab.generate_config import GenerateConfig

    g = GenerateConfig(k=2, temperature=1.0)
    g.top_p = 0.5
    assert (g.sampling.temperature, g.sampling.top_p) == (1.0, 0.5)


def test_unknown_nested_key_and_wrong_type_name_the_dotted_path():
    from metastone_lab.study import StudyConfig

    with pytest.raises(ConfigError, match=r"StudyConfig\.sampling: unknown key 'temprature'\. "
                                          r"Did you mean 'temperature'"):
        from_dict(StudyConfig, {"sampling": {"temprature": 1.0}})
    with pytest.raises(ConfigError, match=r"StudyConfig\.sampling\.temperature: expected a number"):
        from_dict(StudyConfig, {"temperature": "hot"})
    with pytest.raises(ConfigError, match=r"StudyConfig\.sampling\.temperature: expected a number"):
        from_dict(StudyConfig, {"sampling": {"temperature": "hot"}})
    with pytest.raises(ConfigError, match=r"StudyConfig\.train\.sampling\.max_new_tokens: "
                                          r"expected an integer"):
        from_dict(StudyConfig, {"train": {"max_new_tokens": "many"}})
    # an unknown top-level key lists the flat names among the valid ones
    with pytest.raises(ConfigError, match=r"Did you mean 'segmenter'.*segmenter_options"):
        from_dict(StudyConfig, {"segmentr": "fixed"})


def test_bad_segmenter_option_fails_at_load_in_every_form():
    from metastone_lab.study import StudyConfig

    for data in ({"segmenter_options": {"conclusoin": True}},
                 {"segmentation": {"segmenter_options": {"conclusoin": True}}}):
        with pytest.raises(ConfigError, match=r"StudyConfig\.segmenter_options: step segmenter "
                                              r"'reference' has no option 'conclusoin'"):
            from_dict(StudyConfig, data)


def test_train_overrides_may_not_set_a_shared_sub_config():
    from metastone_lab.study import StudyConfig

    for train in ({"segmenter": "fixed"}, {"segmentation": {"segmenter": "fixed"}},
                  {"workload": {"task": "expr"}}, {"segmentation.read_at": "step_token"}):
        with pytest.raises(ConfigError, match="StudyConfig.train sets"):
            from_dict(StudyConfig, {"train": train})
    assert from_dict(StudyConfig, {"train": {"temperature": 1.0}}).train_config().temperature == 1.0


def test_dotted_keys_load_and_the_runner_runs_nested_keys_under_flat_names():
    from metastone_lab.config_tree import flat_params
    from metastone_lab.study import StudyConfig

    assert from_dict(StudyConfig, {"sampling.temperature": 1.2}).temperature == 1.2
    assert flat_params({"sampling": {"temperature": 1.2}, "segmentation.segmenter": "fixed",
                        "k_max": 4}, "spec") == {"temperature": 1.2, "segmenter": "fixed",
                                                 "k_max": 4}
    with pytest.raises(ConfigError, match=r"spec: sampling\.temprature is not a SamplingConfig "
                                          r"field"):
        flat_params({"sampling.temprature": 1.0}, "spec")


def test_a_spec_runs_nested_sub_config_keys_under_their_flat_names():
    from metastone_lab.runner.spec import Spec

    spec = Spec(name="s", notebook="nb.ipynb", parameters={"sampling": {"temperature": 1.2}},
                grid={"segmentation.segmenter": ["reference", "paragraph"]},
                points=[{"workload": {"task": "expr"}}])
    assert spec.parameters == {"temperature": 1.2}
    assert spec.grid == {"segmenter": ["reference", "paragraph"]}
    assert spec.points == [{"task": "expr"}]
