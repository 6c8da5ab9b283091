"""Training modes as a registry (metastone_lab.training.modes): the built-in modes'
flags, config validation against the registry, the checkpoint fingerprint of the
built-in modes (pinned: checkpoints written before the registry still resume), and a
mode registered in a test is accepted by the config and the trainer."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _accel_worker import fixed_batch, make_micro, make_trainer  # noqa: E402

from metastone_lab.config import from_dict  # noqa: E402
from metastone_lab.errors import ConfigError, UnknownNameError  # noqa: E402
from metastone_lab.study import StudyConfig  # noqa: E402
from metastone_lab.train import TrainConfig, train  # noqa: E402
from metastone_lab.training.modes import MODES, TrainingMode, register_mode  # noqa: E402


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Path:
    return make_micro(tmp_path_factory.mktemp("micro"))


@pytest.fixture
def policy_only():
    """A throwaway mode, registered for one test: GRPO on the policy, no head."""

    @register_mode("test_policy_only")
    class PolicyOnly(TrainingMode):
        """GRPO on the policy; the head is never trained."""

        trains_policy = True

    try:
        yield MODES.get("test_policy_only")
    finally:
        MODES.unregister("test_policy_only")
    assert "test_policy_only" not in MODES


def test_builtin_modes_and_their_flags():
    assert MODES.names() == ["head_only", "joint", "separate_prm", "sft"]
    flags = {m: (MODES.get(m).trains_policy, MODES.get(m).trains_head, MODES.get(m).separate_prm,
                 MODES.get(m).data, MODES.get(m).eval_at_start) for m in MODES}
    assert flags == {"joint": (True, True, False, "rollouts", True),
                     "head_only": (False, True, False, "rollouts", True),
                     "sft": (True, False, False, "solutions", False),
                     "separate_prm": (True, True, True, "rollouts", True)}
    assert [m for m in MODES if MODES.get(m).grpo] == ["joint", "separate_prm"]
    assert TrainConfig(mode="head_only").training_mode is MODES.get("head_only")


def test_unknown_mode_is_refused_naming_the_registered_ones():
    with pytest.raises(UnknownNameError, match=r"TrainConfig\.mode: unknown training mode "
                       r"'both'; choose one of: head_only, joint, separate_prm, sft"):
        from_dict(TrainConfig, {"mode": "both"})
    with pytest.raises(ConfigError, match=r"StudyConfig\.train_mode: unknown training mode"):
        from_dict(StudyConfig, {"train_mode": "both"})
    # the study evaluates the head: a mode that trains none is refused, with the choices
    with pytest.raises(ConfigError, match="'sft' trains no scoring head.*head_only, joint, "
                                          "separate_prm, none"):
        from_dict(StudyConfig, {"train_mode": "sft"})
    for ok in ("head_only", "joint", "separate_prm", "none"):
        assert from_dict(StudyConfig, {"train_mode": ok}).train_mode == ok


def test_fingerprint_of_builtin_modes_is_the_one_written_before_the_registry():
    # values computed with the string-test trainer (before training.modes existed): a
    # checkpoint it wrote passes check_compatible now. The shape fields are set
    # explicitly so a change of a default does not move these numbers.
    shape = dict(backbone="tiny", lora_r=8, lora_alpha=16, lora_targets=["q_proj", "v_proj"],
                 head_width_mult=2.0, feature_layer=-2)
    want = {"joint": "0c1cff4f86556c6c", "head_only": "0c1cff4f86556c6c",
            "sft": "0c1cff4f86556c6c", "separate_prm": "2308690e5d14504e"}
    want_conf = {"joint": "01905cc3745fd667", "separate_prm": "8ec4dbf6cb62a926"}
    for mode, fp in want.items():
        cfg = TrainConfig(mode=mode, **shape)
        assert cfg.fingerprint() == fp, mode
        assert cfg.fingerprint_fields()["mode"] == (
            "separate_prm" if mode == "separate_prm" else "policy")
    for mode, fp in want_conf.items():
        assert TrainConfig(mode=mode, head_inputs="hidden+confidence",
                           **shape).fingerprint() == fp, mode


def test_register_mode_checks_the_flags_and_the_name():
    with pytest.raises(ConfigError, match="trains nothing"):
        @register_mode("test_nothing")
        class Nothing(TrainingMode):
            pass
    with pytest.raises(ConfigError, match="SFT.*trains the policy only"):
        @register_mode("test_sft_head")
        class SftHead(TrainingMode):
            trains_policy = True
            trains_head = True
            data = "solutions"
    with pytest.raises(ConfigError, match="separate_prm=True"):
        @register_mode("test_prm_no_head")
        class PrmNoHead(TrainingMode):
            trains_policy = True
            separate_prm = True
    with pytest.raises(ConfigError, match="data='bogus'"):
        @register_mode("test_bogus_data")
        class BogusData(TrainingMode):
            trains_policy = True
            data = "bogus"
    with pytest.raises(ValueError, match="already registered"):
        @register_mode("joint")
        class Joint2(TrainingMode):
            trains_head = True
    with pytest.raises(TypeError, match="TrainingMode subclass"):
        register_mode("test_fn")(lambda: None)
    assert MODES.names() == ["head_only", "joint", "separate_prm", "sft"]


def test_a_mode_registered_in_a_test_is_accepted_by_config_and_trainer(micro, tmp_path,
                                                                        policy_only):
    cfg = from_dict(TrainConfig, {"mode": "test_policy_only"})
    assert cfg.training_mode is policy_only and cfg.fingerprint_fields()["mode"] == "policy"
    with pytest.raises(ConfigError, match="trains no scoring head"):
        from_dict(StudyConfig, {"train_mode": "test_policy_only"})
    # the trainer asks the mode: LoRA learns by GRPO, the head is frozen and never stepped
    t = make_trainer(micro, mode="test_policy_only")
    assert t.mode is policy_only and t.prm is None
    assert all(p.requires_grad for n, p in t.policy.named_parameters() if "lora_" in n)
    assert not any(p.requires_grad for p in t.head.parameters())
    b = fixed_batch(t.tokenizer, t.task)
    lora0 = {n: p.detach().clone() for n, p in t.policy.named_parameters() if "lora_" in n}
    head0 = {k: v.clone() for k, v in t.head.state_dict().items()}
    m = t.update(b)
    assert m["policy_loss"] != 0.0 and "spr_loss" in m
    assert any(not torch.equal(lora0[n], p) for n, p in t.policy.named_parameters()
               if "lora_" in n)
    assert all(torch.equal(head0[k], v) for k, v in t.head.state_dict().items())
    # and the train loop runs it end to end, checkpoint included
    cfg = TrainConfig(mode="test_policy_only", backbone=str(micro), n=2, prompts_per_step=1,
                      steps=1, max_new_tokens=8, lora_r=2, lora_alpha=4, eval_every=0,
                      output_dir=str(tmp_path / "run"),
                      task_options={"n_train": 8, "n_val": 2, "n_test": 2, "n_ood": 0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = train(cfg, tracker=_NullTracker())
    assert res.steps_done == 1 and (res.checkpoint / "score_module.pt").exists()
    assert "policy_loss" in res.last_metrics


class _NullTracker:
    def log_metrics(self, metrics, step=None):
        pass

    def set_tags(self, tags):
        pass

    def log_params(self, params):
        pass
