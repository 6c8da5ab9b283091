"""Prompt formats (metastone_lab.tasks.prompts): how problems are shown to a backbone."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _accel_worker import make_micro  # noqa: E402

from metastone_lab import study  # noqa: E402
from metastone_lab.backbones.tokenizer import build_tokenizer  # noqa: E402
from metastone_lab.errors import ConfigError, UnknownNameError  # noqa: E402
from metastone_lab.tasks import get_task  # noqa: E402
from metastone_lab.tasks.prompts import PromptedTask, apply_prompt_format  # noqa: E402

# a minimal ChatML template (what SmolLM2-Instruct uses), so the chat style is
# tested without a downloaded tokenizer
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(max_number=199)


def test_identity_format_returns_the_task_itself(tok):
    task = get_task("arith")
    assert apply_prompt_format(task, tok, {}) is task
    assert apply_prompt_format(task, tok, {"style": "plain", "shots": 0}) is task


def test_plain_shots_prepend_worked_train_examples(tok):
    task = get_task("arith")
    wrapped = apply_prompt_format(task, tok, {"shots": 2})
    train = task.problems("train", 2)
    for raw, shown in zip(task.problems("test", 5), wrapped.problems("test", 5)):
        assert shown.prompt == f"{train[0].prompt}{train[0].solution}\n\n" \
                               f"{train[1].prompt}{train[1].solution}\n\n{raw.prompt}"
        assert (shown.id, shown.answer, shown.meta) == (raw.id, raw.answer, raw.meta)
        # judging is unchanged: the canonical response is right under either prompt
        assert wrapped.is_correct(raw.solution, shown) and wrapped.first_wrong_step(raw.solution, shown) == -1
    assert wrapped.stats is task.stats and task.stats["judged"] == 5
    # the shown examples are not in the wrapped train split (no problem sees its own solution)
    ids = [p.id for p in wrapped.problems("train", 3)]
    assert ids == [p.id for p in task.problems("train", 5)[2:]]
    assert wrapped.default_size("train") == task.default_size("train") - 2
    # formats never stack: re-formatting a formatted task starts from the raw problems
    again = apply_prompt_format(wrapped, tok, {"shots": 1})
    assert again.problems("test", 1)[0].prompt == \
        f"{train[0].prompt}{train[0].solution}\n\n{task.problems('test', 1)[0].prompt}"
    assert apply_prompt_format(wrapped, tok, {}) is task


def test_chat_format(tmp_path):
    t = build_tokenizer(max_number=199)
    task = get_task("arith")
    with pytest.raises(ConfigError, match="chat template.*style: plain"):
        apply_prompt_format(task, t, {"style": "chat"}).problems("test", 1)
    t.chat_template = CHATML
    wrapped = apply_prompt_format(task, t, {"style": "chat", "shots": 1, "instruction": "Be brief."})
    ex = task.problems("train", 1)[0]
    p, raw = wrapped.problems("test", 1)[0], task.problems("test", 1)[0]
    assert p.prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                        f"<|im_start|>user\n{ex.question}<|im_end|>\n"
                        f"<|im_start|>assistant\n<think>{ex.solution}<|im_end|>\n"
                        f"<|im_start|>user\n{raw.question}<|im_end|>\n"
                        "<|im_start|>assistant\n<think>")
    no_system = apply_prompt_format(task, t, {"style": "chat", "instruction": ""})
    assert no_system.problems("test", 1)[0].prompt.startswith("<|im_start|>user\n")


def test_bad_prompt_format_is_refused_at_load():
    with pytest.raises(UnknownNameError, match="unknown prompt style 'fewshot'; choose one of: chat, plain"):
        study.load_study_config({"prompt_format": {"style": "fewshot"}})
    with pytest.raises(ConfigError, match="shots"):
        study.load_study_config({"prompt_format": {"shots": 99}})
    with pytest.raises(ConfigError, match="prompt_format"):
        study.load_study_config({"prompt_format": {"shot": 2}})
    from metastone_lab.config import from_dict
    from metastone_lab.train import TrainConfig

    with pytest.raises(ConfigError, match="shots"):
        from_dict(TrainConfig, {"prompt_format": {"shots": "two"}})


def test_study_trains_and_evaluates_on_formatted_prompts(tmp_path):
    """The trainer and the evaluation both see the formatted prompt: the test
    samples carry it, and step positions lie in the response, never in the
    worked examples (which contain step markers of their own)."""
    micro = str(make_micro(tmp_path / "micro"))
    cfg = study.load_study_config(dict(
        backbone=micro, train_mode="head_only", train_steps=1, k_max=2, n_test=2, n_val=0,
        max_new_tokens=16, output_dir=str(tmp_path / "out"), prompt_format={"shots": 1},
        train={"n": 2, "prompts_per_step": 1, "eval_every": 0}))
    model, tok = study.prepare_backbone(cfg)
    shot = get_task("arith").problems("train", 1)[0]
    from metastone_lab.train import Trainer

    trainer = Trainer(cfg.train_config(), model=copy.deepcopy(model), tokenizer=tok)
    assert isinstance(trainer.task, PromptedTask)
    assert trainer.task.problems("train", 1)[0].prompt.startswith(shot.prompt + shot.solution)
    trained = study.train_reflective(cfg, model, tok)
    ev = study.evaluate_tts(cfg, trained, tok, log=False)
    for ps in ev.test:
        assert ps.problem.prompt.startswith(shot.prompt + shot.solution)
        for t in ps.trajectories:
            assert all(pos >= t.prompt_len for pos in t.step_positions)
