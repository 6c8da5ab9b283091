"""Catalogue of bad inputs (issue 7 §1): every case asserts the exception TYPE and that the
message names the offending key/value/file AND the fix. Tiny random models and a word-level
tokenizer are built here; no backbone is built, no notebook executed (well under 60 s).

Crash-and-resume (§2) lives in tests/integration/test_checkpoint.py, the tracking outage during a sweep
(§3) in tests/integration/test_runner.py, untrusted files (§4) in tests/unit/test_untrusted_files.py.

Case                                        Input                                       Expected
--------------------------------------------------------------------------------------------------------
Configs and specs
 1 unknown key: TrainConfig                 {'policy_lrr': ...}                         ConfigError, suggests 'policy_lr', lists keys
 2 unknown key: GenerateConfig              {'temprature': ...}                         ConfigError, suggests 'temperature'
 3 unknown key: StudyConfig                 {'k_maxx': ...}                             ConfigError, suggests 'k_max'
 4 unknown key: ArithConfig (get_task)      n_opps_max=3                                ConfigError, suggests 'n_ops_max'
 5 unknown key: spec YAML                   'gird:'                                     ConfigError naming the file, suggests 'grid'
 6 wrong type: TrainConfig                  steps: 'ten'                                ConfigError 'expected an integer'
 7 wrong type: notebook parameter           a: 'three' (notebook declares int)          ConfigError naming a, int, fix the type
 8 out of range: k=0                        GenerateConfig(k=0)                         ConfigError 'use k=1'
 9 out of range: temperature<0              GenerateConfig / TrainConfig temperature<0  ConfigError naming the value and the range
10 out of range: lr<0                       TrainConfig policy_lr=-1e-4                 ConfigError 'must be >= 0'
11 out of range: LoRA r=0                   TrainConfig lora_r=0                        ConfigError 'must be >= 1 (e.g. 8)'
12 out of range: n<2                        TrainConfig n=1                             ConfigError 'set n >= 2'
13 unknown segmenter                        step_mask(..., 'paragrph'), StudyConfig     UnknownNameError listing the valid ones
14 unknown aggregator                       aggregate(..., method='geo')                UnknownNameError listing the valid ones
15 unknown selector                         select(..., 'best')                         UnknownNameError listing the valid ones
16 unknown loss                             TrainConfig(loss='spr2').validate_names()   UnknownNameError listing the valid ones
17 unknown task                             get_task('gsm8k')                           UnknownNameError listing arith, jsonl
18 unknown backbone spec                    load_backbone('tinyy') / './no-such-dir'    UnknownNameError 'did you mean tiny' / CheckpointError
19 regex segmenter without its option       step_mask(..., 'regex')                     ConfigError showing pattern=...
20 grid with an empty list                  grid: {a: []}                               ConfigError 'give it at least one value'
21 spec naming a missing notebook           notebook: notebooks/nope.ipynb              ConfigError naming the path, 'fix notebook:'
22 parameter the notebook does not declare  parameters: {bb: 1}                         ConfigError 'did you mean b', valid names
Models and tokenizers
23 tokenizer with no step token             '.\\n\\n' not one token / no newline token  TokenizerError naming tokenizer, suggests paragraph/regex
24 head/backbone width mismatch             head 48 on a 32-wide backbone; file, too    ShapeError naming both sizes
25 score_module.pt with wrong keys          {'weight', 'bias'}                          CheckpointError listing expected and found keys
26 pickle payload in score_module.pt        a __reduce__ payload                        CheckpointError 'refused', payload never runs
27 adapter for another base model           LoRA from hidden 32 into hidden 48          CheckpointError 'another base model'
28 adapter with another LoRA layout         q,v adapter into a q-only model             CheckpointError naming lora_targets
Data
29 jsonl row missing a field (fail)         on_bad_row='fail'                           DataError with file:line and 'on_bad_row'
30 jsonl row missing a field (skip)         on_bad_row='skip'                           skipped, counted with its line number
31 non-UTF-8 bytes                          b'\\xff\\xfe...'                               DataError 're-encode the file as UTF-8'
32 empty file                               ''                                          DataError 'the file is empty'
33 answers that cannot be parsed            'no idea' (arith and jsonl)                 is_correct False, counted unparsable
Numerics
34 NaN in step logits (scores)              aggregate with NaN at a step                NumericsError naming row and position
35 inf in step logits (loss)                spr_loss with inf at a step                 NumericsError naming row and position
36 NaN in features                          NaN features -> head -> spr_loss            NumericsError naming row and position
37 NaN step score                           aggregate_scores([.5, nan])                 NumericsError naming the step
38 NaN backbone in generation               generate_best_of_n on a NaN-weight model    NumericsError naming the fix
39 all-equal rewards                        group_advantages([1,1,1,1])                 zero advantage, no NaN
40 zero-step trajectories                   empty step mask                             aggregate 0.0 + flag; spr_loss 0, finite grad
Environment
41 unreachable tracking server              closed port                                 TrackingError within 10 s naming URI and fix
42 unwritable output directory              /sys/... (refuses even root)                MetastoneError 'not writable'
43 full/blocked cache dir                   METASTONE_LAB_CACHE under a regular file    MetastoneError 'a file is in the way', no training
"""
from __future__ import annotations

import json
import math
import re
import socket
import time
from pathlib import Path

import pytest
import torch
import yaml

from metastone_lab.config import from_dict
from metastone_lab.errors import (CheckpointError, ConfigError, DataError, MetastoneError,
                                  NumericsError, ShapeError, TokenizerError, TrackingError,
                                  UnknownNameError)

NB = Path(__file__).resolve().parents[1] / "data" / "notebooks" / "tiny_study.ipynb"
REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- helpers

def word_tokenizer(marker: bool = True, para: bool = True, newline: bool = True):
    """A word-level fast tokenizer. ``marker``: '.\\n\\n' is one token; ``para``: '\\n\\n' is;
    ``newline``: '\\n' is (else a newline is the unknown token)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "</s>", ".", " ", "a", "b", "1", "2", "3", "+", "=",
             "<think>", "</think>"] + (["\n"] if newline else [])
    pieces = ["<think>", "</think>"]
    if marker:
        words.append(".\n\n")
        pieces.append(r"\.\n\n")
    if para:
        words.append("\n\n")
        pieces.append(r"\n\n")
    pieces += [r"\n", r"\.", " ", r"[A-Za-z0-9]+", r"[^\sA-Za-z0-9]"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("|".join(pieces)), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="</s>", name_or_path=f"catalogue-tok-m{int(marker)}p{int(para)}n{int(newline)}")


def tiny_llama(hidden: int = 32, vocab: int = 32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=64, pad_token_id=0, eos_token_id=2, bos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def lora(model, targets=("q_proj", "v_proj"), r: int = 2):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=4, target_modules=list(targets),
                                            lora_dropout=0.0))


def write_spec(tmp_path: Path, name: str = "s", **kw) -> Path:
    data = {"name": name, "notebook": str(NB), **kw}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the block ends: nothing listens


# ============================================================== configs and specs

def test_01_unknown_key_train_config():
    from metastone_lab.train import TrainConfig

    with pytest.raises(ConfigError, match=r"TrainConfig: unknown key 'policy_lrr'\. "
                                          r"Did you mean 'policy_lr'\?.*Valid keys:.*head_lr"):
        from_dict(TrainConfig, {"policy_lrr": 1e-4})


def test_02_unknown_key_generate_config():
    from metastone_lab.generate import GenerateConfig

    with pytest.raises(ConfigError, match=r"GenerateConfig: unknown key 'temprature'\. "
                                          r"Did you mean 'temperature'\?"):
        GenerateConfig.from_dict({"k": 4, "temprature": 0.7})


def test_03_unknown_key_study_config():
    from metastone_lab.study import StudyConfig, load_study_config

    with pytest.raises(ConfigError, match=r"StudyConfig: unknown key 'k_maxx'\. "
                                          r"Did you mean 'k_max'\?.*Valid keys"):
        load_study_config({"k_maxx": 8, "mlflow_run_id": None})  # reserved names are ignored
    # a bad key inside the nested ``train`` overrides names its path
    with pytest.raises(ConfigError, match=r"StudyConfig\.train: unknown key 'lora_rank'"):
        from_dict(StudyConfig, {"train": {"lora_rank": 4}}).train_config()


def test_04_unknown_key_arith_config():
    from metastone_lab.tasks import get_task

    with pytest.raises(ConfigError, match=r"ArithConfig: unknown key 'n_opps_max'\. "
                                          r"Did you mean 'n_ops_max'\?"):
        get_task("arith", n_opps_max=3)


def test_05_unknown_key_spec_yaml(tmp_path):
    from metastone_lab import runner

    spec = write_spec(tmp_path, "typo", gird={"a": [1, 2]})
    with pytest.raises(ConfigError, match=rf"spec '{re.escape(str(spec))}': unknown key 'gird'\. "
                                          r"Did you mean 'grid'\?"):
        runner.load_spec(spec, root=REPO)


def test_06_wrong_type_config_value():
    from metastone_lab.train import TrainConfig, load_config

    with pytest.raises(ConfigError, match=r"TrainConfig\.steps: expected an integer, got str 'ten'"):
        from_dict(TrainConfig, {"steps": "ten"})
    # the same through --set (values are read as YAML, so 'lora_r=eight' stays a string)
    with pytest.raises(ConfigError, match=r"TrainConfig\.lora_r: expected an integer, got str 'eight'"):
        load_config(None, ["lora_r=eight"])


def test_07_wrong_type_notebook_parameter(tmp_path):
    from metastone_lab import runner

    spec, nb = runner.load_spec(write_spec(tmp_path, parameters={"a": "three"}), root=REPO)
    with pytest.raises(ConfigError, match=r"parameter 'a' = 'three' is a str, but the notebook "
                                          r"declares int.*Fix the value's type"):
        runner.validate_points(runner.expand_points(spec), nb)


def test_08_k_zero():
    from metastone_lab.generate import GenerateConfig

    with pytest.raises(ConfigError, match=r"GenerateConfig\.k must be >= 1, got 0; use k=1"):
        GenerateConfig(k=0)
    from metastone_lab.study import StudyConfig

    with pytest.raises(ConfigError, match=r"StudyConfig\.k_max must be >= 1, got 0"):
        from_dict(StudyConfig, {"k_max": 0})


def test_09_negative_temperature():
    from metastone_lab.generate import GenerateConfig
    from metastone_lab.train import TrainConfig

    with pytest.raises(ConfigError, match=r"GenerateConfig\.temperature must be >= 0, got -0\.5; "
                                          r"use temperature=0 for greedy"):
        GenerateConfig(k=1, temperature=-0.5)
    with pytest.raises(ConfigError, match=r"TrainConfig\.temperature must be > 0, got -0\.5"):
        from_dict(TrainConfig, {"temperature": -0.5})


def test_10_negative_learning_rate():
    from metastone_lab.train import TrainConfig

    with pytest.raises(ConfigError, match=r"TrainConfig\.policy_lr must be >= 0, got -0\.0001"):
        from_dict(TrainConfig, {"policy_lr": -1e-4})
    with pytest.raises(ConfigError, match=r"TrainConfig\.head_lr must be >= 0, got -1"):
        from_dict(TrainConfig, {"head_lr": -1})


def test_11_lora_rank_zero():
    from metastone_lab.train import TrainConfig

    with pytest.raises(ConfigError, match=r"TrainConfig\.lora_r=0: LoRA rank must be >= 1 \(e\.g\. 8\)"):
        from_dict(TrainConfig, {"lora_r": 0})


def test_12_group_size_below_two():
    from metastone_lab.train import TrainConfig

    with pytest.raises(ConfigError, match=r"TrainConfig\.n=1: GRPO needs a group of at least 2.*"
                                          r"set n >= 2"):
        from_dict(TrainConfig, {"n": 1})


def test_13_unknown_segmenter():
    from metastone_lab.steps import step_mask
    from metastone_lab.study import StudyConfig

    ids = torch.zeros((1, 4), dtype=torch.long)
    with pytest.raises(UnknownNameError, match=r"unknown step segmenter 'paragrph'; choose one of:.*"
                                               r"paragraph.*regex"):
        step_mask(ids, word_tokenizer(), "paragrph")
    with pytest.raises(UnknownNameError, match=r"'paragrph'.*paragraph"):
        from_dict(StudyConfig, {"segmenter": "paragrph"})


def test_14_unknown_aggregator():
    from metastone_lab.scoring import aggregate

    with pytest.raises(UnknownNameError, match=r"unknown aggregator 'geo'; choose one of:.*geometric"):
        aggregate(torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), method="geo")


def test_15_unknown_selector():
    from metastone_lab.select import select

    trajs = [{"scores": {"geometric": 0.3}, "answer": "1"}]
    with pytest.raises(UnknownNameError, match=r"unknown selector 'best'; choose one of:.*majority.*"
                                               r"sprm_bon"):
        select(trajs, "best")


def test_16_unknown_loss():
    from metastone_lab.loss import get_loss
    from metastone_lab.train import TrainConfig

    with pytest.raises(UnknownNameError, match=r"unknown loss 'spr2'; choose one of:.*spr_no_filter"):
        from_dict(TrainConfig, {"loss": "spr2"}).validate_names()
    with pytest.raises(UnknownNameError, match=r"'spr2'"):
        get_loss("spr2")


def test_17_unknown_task():
    from metastone_lab.tasks import get_task

    with pytest.raises(UnknownNameError, match=r"unknown task 'gsm8k'; choose one of: arith, expr, jsonl"):
        get_task("gsm8k")


def test_18_unknown_backbone_spec(tmp_path):
    from metastone_lab.backbones import load_backbone

    with pytest.raises(UnknownNameError, match=r"unknown backbone 'tinyy': did you mean 'tiny'\? "
                                               r"Built-in backbones:.*smollm2.*local model directory"):
        load_backbone("tinyy", cache_dir=tmp_path)
    missing = tmp_path / "no-such-model"
    with pytest.raises(CheckpointError, match=rf"backbone path '{re.escape(str(missing))}' is not a "
                                              r"directory; give a directory with config\.json"):
        load_backbone(str(missing))
    assert list(tmp_path.iterdir()) == []  # nothing was built


def test_19_regex_segmenter_without_pattern():
    from metastone_lab.steps import step_mask

    with pytest.raises(ConfigError, match=r"step strategy 'regex' needs option pattern='\.\.\.'"):
        step_mask(torch.zeros((1, 3), dtype=torch.long), word_tokenizer(), "regex")


def test_20_grid_with_empty_list(tmp_path):
    from metastone_lab import runner

    with pytest.raises(ConfigError, match=r"grid\.a is an empty list.*give it at least one value"):
        runner.load_spec(write_spec(tmp_path, grid={"a": [], "b": [0.5]}), root=REPO)


def test_21_spec_names_missing_notebook(tmp_path):
    from metastone_lab import runner

    spec = write_spec(tmp_path, notebook="notebooks/does_not_exist.ipynb")
    with pytest.raises(ConfigError, match=r"notebook 'notebooks/does_not_exist\.ipynb' does not "
                                          r"exist.*fix 'notebook:'"):
        runner.load_spec(spec, root=REPO)


def test_22_parameter_not_declared_by_notebook(tmp_path):
    from metastone_lab import runner

    spec, nb = runner.load_spec(write_spec(tmp_path, parameters={"a": 2},
                                           grid={"bb": [1, 2]}), root=REPO)
    with pytest.raises(ConfigError, match=r"point 0 \(bb-1\) of tiny_study\.ipynb: parameter 'bb' is "
                                          r"not declared.*Did you mean 'b'\?.*Valid names: a, b, "
                                          r"fail_if_exists, kill_at_a, kill_if_exists, label, seed\. Fix the spec/--set"):
        runner.validate_points(runner.expand_points(spec), nb)
    # the same through --set
    spec, nb = runner.load_spec(write_spec(tmp_path, "s2"), overrides=["lable=y"], root=REPO)
    with pytest.raises(ConfigError, match=r"parameter 'lable'.*Did you mean 'label'\?"):
        runner.validate_points(runner.expand_points(spec), nb)


# ========================================================== models and tokenizers

def test_23_tokenizer_without_step_token():
    from metastone_lab.steps import check_strategy

    split = word_tokenizer(marker=False)          # '.\n\n' -> '.' + '\n\n' (GPT-2-like)
    with pytest.raises(TokenizerError, match=r"step strategy 'reference' misfires with tokenizer "
                                             r".*catalogue-tok-m0p1n1.*strategy='paragraph' or "
                                             r"strategy='regex'"):
        check_strategy(split, "reference")
    check_strategy(split, "paragraph")             # the suggested fix works
    bare = word_tokenizer(marker=False, para=False, newline=False)  # no newline token at all
    with pytest.raises(TokenizerError, match=r"'paragraph' can never fire with tokenizer .*"
                                             r"catalogue-tok-m0p0n0.*no token contains a newline.*"
                                             r"strategy='regex'"):
        check_strategy(bare, "paragraph")


def test_24_head_backbone_width_mismatch(tmp_path):
    from metastone_lab.sprm import ReflectiveModel, SPRMHead, load_score_module, save_score_module

    backbone = tiny_llama(hidden=32)
    with pytest.raises(ShapeError, match=r"SPRM head width 48 does not match the head input "
                                         r"size 32 \(backbone hidden size 32, head_inputs="
                                         r"'hidden'\); build/load the head with hidden_size=32"):
        ReflectiveModel(backbone, head=SPRMHead(48))
    path = save_score_module(SPRMHead(48), tmp_path / "score_module.pt")
    with pytest.raises(ShapeError, match=rf"{re.escape(str(path))}: the head was trained on inputs "
                                         r"of width 48 but this model's head reads width 32"):
        load_score_module(path, hidden_size=32)


def test_25_score_module_wrong_keys(tmp_path):
    from metastone_lab.sprm import load_score_module

    path = tmp_path / "score_module.pt"
    torch.save({"weight": torch.zeros(1, 32), "bias": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: unexpected SPRM head keys\. "
                                              r"Expected \['0\.weight', '0\.bias', '3\.weight', "
                                              r"'3\.bias'\].*found \['bias', 'weight'\]\. "
                                              r"Save only the head's state dict"):
        load_score_module(path, hidden_size=32)


_PAYLOAD_RAN: list[str] = []


def _payload_side_effect() -> dict:
    _PAYLOAD_RAN.append("ran")
    return {}


class _Payload:
    """Unpickling this calls ``_payload_side_effect`` (an attacker's code, in real life)."""

    def __reduce__(self):
        return (_payload_side_effect, ())


def test_26_pickle_payload_is_refused(tmp_path):
    from metastone_lab.sprm import load_score_module
    from metastone_lab.training.checkpoint import torch_load

    path = tmp_path / "score_module.pt"
    torch.save({"0.weight": torch.zeros(64, 32), "evil": _Payload()}, path)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: refused to load: the file "
                                              r"holds arbitrary pickled objects.*weights_only=True.*"
                                              r"Re-save only the state dict"):
        load_score_module(path, hidden_size=32)
    with pytest.raises(CheckpointError, match=r"cannot be loaded safely \(weights_only=True\)"):
        torch_load(path)
    assert _PAYLOAD_RAN == []   # the payload never executed
    # control: a plain torch.load(weights_only=False) WOULD run it
    torch.load(path, weights_only=False)
    assert _PAYLOAD_RAN == ["ran"]


def test_27_adapter_for_another_base_model(tmp_path):
    from metastone_lab.training.checkpoint import load_adapter_weights

    lora(tiny_llama(hidden=32)).save_pretrained(str(tmp_path / "adapter"))
    other = lora(tiny_llama(hidden=48))
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors: adapter shapes do not match "
                                              r"this model.*another base model or LoRA rank; use the "
                                              r"matching backbone/lora_r"):
        load_adapter_weights(other, tmp_path / "adapter")


def test_28_adapter_with_another_lora_layout(tmp_path):
    from metastone_lab.training.checkpoint import load_adapter_weights

    lora(tiny_llama(hidden=32), targets=("q_proj", "v_proj")).save_pretrained(str(tmp_path / "a"))
    q_only = lora(tiny_llama(hidden=32), targets=("q_proj",))
    with pytest.raises(CheckpointError, match=r"adapter does not match this model \(8 tensors saved, "
                                              r"4 LoRA tensors here.*use the matching "
                                              r"backbone/lora_targets"):
        load_adapter_weights(q_only, tmp_path / "a")


# ========================================================================= data

def _jsonl(tmp_path, rows: list[str], name="d.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return p


GOOD = json.dumps({"question": "1+1?", "answer": "#### 2"})


def test_29_jsonl_row_missing_field_fail(tmp_path):
    from metastone_lab.tasks import get_task

    p = _jsonl(tmp_path, [GOOD, json.dumps({"question": "2+2?"}), GOOD])
    task = get_task("jsonl", path=str(p), on_bad_row="fail")
    with pytest.raises(DataError, match=rf"{re.escape(str(p))}:2: missing or empty field\(s\) "
                                        r"\['answer'\]\. Fix the row, or pass on_bad_row='skip'"):
        task.problems("test")


def test_30_jsonl_row_missing_field_skip_and_count(tmp_path):
    from metastone_lab.tasks import get_task

    p = _jsonl(tmp_path, [GOOD, json.dumps({"question": "2+2?"}), "{not json", GOOD])
    task = get_task("jsonl", path=str(p))  # on_bad_row="skip" is the default
    probs = task.problems("test")
    assert [pr.meta["line"] for pr in probs] == [1, 4]
    assert task.stats["bad_rows"] == 2
    assert [(line, reason.split(" ")[0]) for _, line, reason in task.bad_rows] == [
        (2, "missing"), (3, "invalid")]


def test_31_non_utf8_bytes(tmp_path):
    from metastone_lab.config import load_yaml
    from metastone_lab.tasks import get_task

    p = tmp_path / "latin1.jsonl"
    p.write_bytes(GOOD.encode() + b"\n" + '{"question": "caf\xe9", "answer": "1"}'.encode("latin-1"))
    with pytest.raises(DataError, match=rf"{re.escape(str(p))}: not valid UTF-8.*re-encode the file "
                                        r"as UTF-8"):
        get_task("jsonl", path=str(p)).problems("test")
    y = tmp_path / "spec.yaml"
    y.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(y))}: not valid UTF-8.*save the file as UTF-8"):
        load_yaml(y)


def test_32_empty_file(tmp_path):
    from metastone_lab import runner
    from metastone_lab.tasks import get_task

    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(p))}: the file is empty; it must hold one "
                                        r"JSON object per line with 'question' and 'answer'"):
        get_task("jsonl", path=str(p)).problems("test")
    spec = tmp_path / "empty.yaml"
    spec.write_text("")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(spec))}: the file is empty; it must hold "
                                          r"a YAML mapping"):
        runner.load_spec(spec, root=REPO)


def test_33_unparsable_answers_count_as_incorrect(tmp_path):
    from metastone_lab.tasks import get_task

    arith = get_task("arith")
    prob = arith.problems("test", 1)[0]
    for text in ["no idea", "", "</think> The answer is banana.", "\x00\uffff"]:
        assert arith.is_correct(text, prob) is False
    assert arith.stats["unparsable"] >= 3 and arith.stats["judged"] == 4
    assert arith.is_correct(prob.solution, prob) is True   # control: a parsable answer still scores
    jt = get_task("jsonl", path=str(_jsonl(tmp_path, [GOOD])))
    jp = jt.problems("test")[0]
    assert jt.is_correct("I give up \\boxed{", jp) is False
    assert jt.is_correct("\\boxed{2}", jp) is True


# ===================================================================== numerics

def test_34_nan_step_logit_in_scores():
    from metastone_lab.scoring import aggregate

    logits = torch.zeros(3, 6)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[:, [1, 4]] = True
    logits[2, 4] = float("nan")
    logits[0, 0] = float("nan")       # unscored position: ignored
    with pytest.raises(NumericsError, match=r"step logit at row 2, position 4 is nan.*check the "
                                            r"head/backbone for overflow"):
        aggregate(logits, mask)
    logits[2, 4] = 0.0
    assert torch.isfinite(aggregate(logits, mask)).all()


def test_35_inf_step_logit_in_loss():
    from metastone_lab.loss import spr_loss

    logits = torch.zeros(2, 5)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 2] = mask[1, 3] = True
    logits[1, 3] = float("inf")
    with pytest.raises(NumericsError, match=r"spr_loss: step logit at row 1, position 3 is inf; "
                                            r"check the head/backbone \(lower the learning rate, use fp32\)"):
        spr_loss(logits, mask, torch.tensor([1.0, 0.0]))


def test_36_nan_features_reach_the_loss_as_a_named_error():
    from metastone_lab.loss import spr_loss
    from metastone_lab.sprm import SPRMHead

    head = SPRMHead(8, dropout=0.0)
    feats = torch.randn(2, 4, 8)
    feats[0, 3, 5] = float("nan")   # one poisoned feature at row 0, position 3
    logits = head(feats)
    mask = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(NumericsError, match=r"row 0, position 3 is nan"):
        spr_loss(logits, mask, torch.tensor([1.0, 0.0]))


def test_37_nan_step_score():
    from metastone_lab.scoring import aggregate_scores

    with pytest.raises(NumericsError, match=r"step score 1 is nan; scores must be finite in \[0, 1\]"):
        aggregate_scores([0.5, math.nan, 0.9])
    with pytest.raises(NumericsError, match=r"apply sigmoid to logits"):
        aggregate_scores([0.5, 2.3])


def test_38_nan_backbone_in_generation():
    from metastone_lab.generate import GenerateConfig, generate_best_of_n
    from metastone_lab.sprm import ReflectiveModel
    from metastone_lab.tasks import Problem

    tok = word_tokenizer()
    backbone = tiny_llama(hidden=32, vocab=len(tok))
    with torch.no_grad():
        backbone.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")  # a diverged weight
    model = ReflectiveModel(backbone)
    prob = Problem(id="p0", question="1+2", answer="3", prompt="1 + 2 = <think>")
    with pytest.raises(NumericsError, match=r"next-token logits after the \d+-token prompt contain "
                                            r"NaN/inf.*load an earlier checkpoint or run in float32"):
        generate_best_of_n(model, tok, [prob], None, GenerateConfig(k=2, max_new_tokens=3,
                                                                    temperature=1.0))


def test_39_all_equal_rewards_zero_advantage():
    from metastone_lab.training.grpo import group_advantages

    adv = group_advantages(torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]), n=4)
    assert torch.isfinite(adv).all()
    assert adv[:4].tolist() == [0.0, 0.0, 0.0, 0.0]          # all-equal group: no signal
    assert adv[4:].abs().min() > 0.5                         # mixed group: nonzero signal
    assert group_advantages(torch.zeros(3), n=3).tolist() == [0.0, 0.0, 0.0]


def test_40_zero_step_trajectories():
    from metastone_lab.loss import spr_loss
    from metastone_lab.scoring import AGGREGATORS, aggregate_scores, aggregate_with_flags

    logits = torch.randn(2, 5, requires_grad=True)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, 2] = True                                        # row 0 has no step
    for method in AGGREGATORS.names():
        scores, empty = aggregate_with_flags(logits, mask, method)
        assert scores[0].item() == 0.0 and empty.tolist() == [True, False], method
    assert aggregate_scores([], "geometric") == 0.0
    loss, diag = spr_loss(logits, torch.zeros_like(mask), torch.tensor([1.0, 0.0]))
    assert loss.item() == 0.0 and diag["n_steps"] == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0


# ================================================================== environment

def test_41_unreachable_tracking_server_fails_fast(monkeypatch):
    from metastone_lab import tracking

    uri = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match=rf"MLflow tracking server {re.escape(uri)} is not "
                                            r"reachable.*Start the server.*MLFLOW_TRACKING_URI"):
        with tracking.Tracker().run("catalogue"):
            pass
    assert time.monotonic() - t0 < 10


def test_42_unwritable_output_directory():
    from metastone_lab.sprm import SPRMHead, save_score_module

    # /sys refuses new entries even for root (permission bits are ignored for root)
    out = "/sys/metastone-lab-catalogue/score_module.pt"
    with pytest.raises(MetastoneError, match=r"cannot create directory '/sys/metastone-lab-catalogue'"
                                             r".*not writable: choose a writable output"):
        save_score_module(SPRMHead(4), out)


def test_43_blocked_cache_dir_fails_before_training(tmp_path, monkeypatch):
    from metastone_lab.backbones import build as build_mod
    from metastone_lab.backbones import load_backbone

    blocker = tmp_path / "cache-file"
    blocker.write_text("a regular file where the cache directory should be")
    monkeypatch.setenv("METASTONE_LAB_CACHE", str(blocker / "metastone"))

    def no_training(*a, **k):
        raise AssertionError("the build trained before checking the cache dir")

    monkeypatch.setattr(build_mod, "train", no_training)
    t0 = time.monotonic()
    with pytest.raises(MetastoneError, match=rf"cannot create directory '{re.escape(str(blocker))}"
                                             rf"/metastone/backbones': a file is in the way "
                                             rf"\('{re.escape(str(blocker))}'\); remove it or "
                                             r"choose another output/cache directory"):
        load_backbone("tiny", log=lambda m: None)
    assert time.monotonic() - t0 < 10
