"""Checkpoints: atomic writes, resume picks the last complete checkpoint,
incompatible checkpoints are refused, and a SIGKILLed training run resumes to
exactly the state of an uninterrupted run (issue 7 §2)."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _accel_worker import fixed_batch, make_micro, make_trainer  # noqa: E402

from metastone_lab.errors import CheckpointError, ConfigError  # noqa: E402
from metastone_lab.train import TrainConfig, train  # noqa: E402
from metastone_lab.training import checkpoint as ck  # noqa: E402
from metastone_lab.training.metrics_log import JsonlLog  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TASK_OPTS = {"n_train": 64, "n_val": 8, "n_test": 8, "n_ood": 0}
TIMING_KEYS = {"step_s", "rollout_s"}


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Path:
    return make_micro(tmp_path_factory.mktemp("micro"))


def _cfg(micro, out, **kw) -> TrainConfig:
    base = dict(backbone=str(micro), n=2, prompts_per_step=2, steps=4, max_new_tokens=12,
                lora_r=2, lora_alpha=4, eval_every=2, eval_val_problems=2, eval_test_problems=2,
                eval_samples=2, checkpoint_every=2, output_dir=str(out), task_options=TASK_OPTS)
    base.update(kw)
    return TrainConfig(**base)


def _quiet_train(cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(cfg)


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {f"adapter/{k}": v for k, v in
           load_file(str(ckpt / "adapter" / "adapter_model.safetensors")).items()}
    out.update({f"head/{k}": v for k, v in
                load_file(str(ckpt / "score_module.safetensors")).items()})
    return out


def test_save_load_roundtrip_restores_weights_optimisers_and_rng(micro, tmp_path):
    t = make_trainer(micro)
    b = fixed_batch(t.tokenizer, t.task)
    t.update(b)
    t.step = 1
    path = t.save(tmp_path)
    assert path.name == "ckpt-1" and (tmp_path / "latest").read_text().strip() == "ckpt-1"
    for f in ("adapter/adapter_model.safetensors", "score_module.pt", "score_module.safetensors",
              "optim-policy.pt", "optim-head.pt", "rng-0.pt", "state.json"):
        assert (path / f).exists(), f
    draw = torch.rand(3)
    t2 = make_trainer(micro)
    t2.load(path)
    assert torch.equal(torch.rand(3), draw)  # RNG restored to the save point
    for (k, v), (k2, v2) in zip(t.head.state_dict().items(), t2.head.state_dict().items()):
        assert torch.equal(v, v2)
    lora = {k: v for k, v in t.policy.state_dict().items() if "lora_" in k}
    lora2 = {k: v for k, v in t2.policy.state_dict().items() if "lora_" in k}
    assert all(torch.equal(lora[k], lora2[k]) for k in lora)
    assert t2.optimizers["head"].state_dict()["state"][0]["step"] == 1
    # identical next update from the restored state
    m1, m2 = t.update(b), t2.update(b)
    assert m1["spr_loss"] == m2["spr_loss"] and m1["policy_loss"] == m2["policy_loss"]


def test_crash_during_checkpoint_write_leaves_previous_checkpoint_usable(micro, tmp_path,
                                                                          monkeypatch):
    t = make_trainer(micro)
    t.step = 1
    t.save(tmp_path)

    def boom(name):
        if name == "optim-policy.pt":  # half the files are on disk
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(ck, "_AFTER_WRITE", boom)
    t.step = 2
    with pytest.raises(KeyboardInterrupt):
        t.save(tmp_path)
    monkeypatch.setattr(ck, "_AFTER_WRITE", None)
    stale = list(tmp_path.glob(".ckpt-2.tmp-*"))
    assert stale and (stale[0] / "score_module.pt").exists()  # half-written temp dir
    assert not (tmp_path / "ckpt-2").exists()
    assert (tmp_path / "latest").read_text().strip() == "ckpt-1"
    assert ck.find_resume_checkpoint(tmp_path).name == "ckpt-1"
    make_trainer(micro).load(tmp_path / "ckpt-1")  # loads fine
    t.step = 3
    t.save(tmp_path)
    assert not list(tmp_path.glob(".ckpt-*.tmp-*"))  # stale temp dir cleaned


def test_resume_skips_incomplete_checkpoint_and_stale_pointer(micro, tmp_path):
    t = make_trainer(micro)
    for s in (1, 2):
        t.step = s
        t.save(tmp_path)
    (tmp_path / "ckpt-2" / "state.json").unlink()  # ckpt-2 incomplete
    assert ck.find_resume_checkpoint(tmp_path).name == "ckpt-1"
    (tmp_path / "latest").write_text("ckpt-9\n")  # pointer to a missing dir
    assert ck.find_resume_checkpoint(tmp_path).name == "ckpt-1"


def test_incompatible_checkpoint_names_both_values(micro, tmp_path):
    t = make_trainer(micro)
    t.step = 1
    path = t.save(tmp_path)
    with pytest.raises(CheckpointError, match=r"head_width_mult: checkpoint has 2\.0, this run "
                                              r"has 4\.0"):
        make_trainer(micro, head_width_mult=4.0).load(path)
    with pytest.raises(CheckpointError, match="lora_r: checkpoint has 4, this run has 8"):
        make_trainer(micro, lora_r=8).load(path)
    state = json.loads((path / "state.json").read_text())
    state["fingerprint_fields"]["backbone"] = "other-model"
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="backbone: checkpoint has 'other-model'"):
        make_trainer(micro).load(path)


def test_pickle_payload_in_optimizer_file_is_refused(micro, tmp_path):
    t = make_trainer(micro)
    t.step = 1
    path = t.save(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(path / "optim-head.pt", "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(CheckpointError, match="weights_only"):
        make_trainer(micro).load(path)


def test_jsonl_log_truncates_after_step_and_drops_torn_line(tmp_path):
    log = JsonlLog(tmp_path / "m.jsonl")
    for s in (1, 2, 3):
        log.append({"step": s, "x": s})
    with open(log.path, "a") as f:
        f.write('{"step": 4, "x"')  # killed mid-line
    assert [r["step"] for r in log.read()] == [1, 2, 3]
    assert log.truncate_after(2) == 1
    log.append({"step": 3, "x": 30})
    assert [(r["step"], r["x"]) for r in log.read()] == [(1, 1), (2, 2), (3, 30)]


def test_existing_checkpoints_without_resume_is_an_error(micro, tmp_path):
    _quiet_train(_cfg(micro, tmp_path, steps=2))
    with pytest.raises(ConfigError, match="resume: true.*--fresh"):
        _quiet_train(_cfg(micro, tmp_path, steps=4))
    res = _quiet_train(_cfg(micro, tmp_path, steps=4, resume=True))
    assert res.start_step == 2 and res.steps_done == 4


def test_resume_refuses_a_checkpoint_of_another_config_and_fresh_starts_over(micro, tmp_path):
    """An explicit resume continues only the config that wrote the checkpoint: a changed
    result field (here filter_warmup_steps, kl_coef), other inputs, or a checkpoint past
    `steps` stop with a ConfigError naming the keys and the fix; bookkeeping fields may
    change; --fresh starts over and keeps the old checkpoints aside."""
    from metastone_lab.training.config import BOOKKEEPING_FIELDS

    class Rec:
        def __init__(self):
            self.params, self.metrics, self.tags = {}, [], {}

        def log_params(self, p):
            self.params.update(p)

        def log_metrics(self, m, step=None):
            self.metrics.append((step, dict(m)))

        def set_tags(self, t):
            self.tags.update(t)

    first = _quiet_train(_cfg(micro, tmp_path, steps=2, eval_every=0))
    with pytest.raises(ConfigError) as e:
        _quiet_train(_cfg(micro, tmp_path, steps=2, eval_every=0, resume=True,
                          filter_warmup_steps=1, kl_coef=0.5))
    msg = str(e.value)
    assert "filter_warmup_steps: checkpoint has 0, this run has 1" in msg
    assert "kl_coef: checkpoint has 0.001, this run has 0.5" in msg
    assert "--fresh" in msg and "ckpt-2" in msg
    with pytest.raises(ConfigError, match="at step 2, past this run's steps=1"):
        _quiet_train(_cfg(micro, tmp_path, steps=1, eval_every=0, resume=True))
    with pytest.raises(ConfigError, match=r"inputs: checkpoint has \{\}"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train(_cfg(micro, tmp_path, steps=2, eval_every=0, resume=True),
                  fingerprint_extra={"backbone_config": "other"})
    # bookkeeping may differ: the same run, continued (nothing left to train), and the
    # run's tracker still gets the params and the curve of the weights it reports
    assert {"output_dir", "checkpoint_every", "keep_checkpoints", "device"} <= set(
        BOOKKEEPING_FIELDS)
    rec = Rec()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        same = train(_cfg(micro, tmp_path, steps=2, eval_every=0, resume=True,
                          checkpoint_every=1, keep_checkpoints=5, device="cpu"), rec)
    assert same.start_step == 2 and same.steps_done == 2
    assert rec.params["filter_warmup_steps"] == 0 and rec.params["steps"] == 2
    assert sorted(s for s, m in rec.metrics if "spr_loss" in m) == [1, 2]
    assert "ckpt-2" in rec.tags["metastone.train_resumed_from"]
    # --fresh: a new run from step 0 in the same folder; the old checkpoints are kept
    res = _quiet_train(_cfg(micro, tmp_path, steps=2, eval_every=0, fresh=True,
                            filter_warmup_steps=1))
    assert res.start_step == 0 and res.steps_done == 2
    assert ck.read_state(res.checkpoint)["config"]["filter_warmup_steps"] == 1
    (old,) = tmp_path.glob("superseded-*")
    assert ck.read_state(old / "ckpt-2")["config"]["filter_warmup_steps"] == 0
    assert ck.is_complete(old / "ckpt-2") and (old / "metrics.jsonl").is_file()
    assert first.checkpoint == tmp_path / "ckpt-2" and (tmp_path / "ckpt-2").is_dir()
    with pytest.raises(ConfigError, match="resume and fresh"):
        _cfg(micro, tmp_path, resume=True, fresh=True)


def test_sigkill_mid_run_then_resume_equals_uninterrupted_run(micro, tmp_path):
    """Start training in a subprocess, SIGKILL it after the first checkpoint, resume
    in-process; compare with an uninterrupted run of the same seed: identical final
    adapter + head tensors and identical metric rows (timings excluded)."""
    steps = 40
    kw = dict(steps=steps, checkpoint_every=3, eval_every=5, keep_checkpoints=2, seed=7)
    crashed = tmp_path / "crashed"
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(_cfg(micro, crashed, **kw).to_dict()))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "metastone_lab.train", "--config",
                             str(cfg_file)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (crashed / "latest").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        time.sleep(0.3)  # let it run on into the next steps / checkpoint writes
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    last = ck.find_resume_checkpoint(crashed)
    k = int(last.name.split("-")[1])
    assert 3 <= k < steps, "killed too late: the test would not exercise resume"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = _quiet_train(_cfg(micro, crashed, resume=True, **kw))
        ref = _quiet_train(_cfg(micro, tmp_path / "reference", **kw))
    finally:
        torch.set_num_threads(threads)
    assert res.start_step == k  # (a) continued from the last complete checkpoint
    rows = JsonlLog(crashed / "metrics.jsonl").read()
    assert [r["step"] for r in rows] == list(range(0, steps + 1))  # (b) no gaps / duplicates
    ref_rows = JsonlLog(tmp_path / "reference" / "metrics.jsonl").read()
    strip = [{k2: v for k2, v in r.items() if k2 not in TIMING_KEYS} for r in rows]
    ref_strip = [{k2: v for k2, v in r.items() if k2 not in TIMING_KEYS} for r in ref_rows]
    assert strip == ref_strip  # (c) same curves ...
    a, b = _tensors(res.checkpoint), _tensors(ref.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)  # ... same state
