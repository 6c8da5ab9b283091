"""The representation probe (metastone_lab.probe): the logistic probe and the
within-problem metrics on synthetic data, then one tiny end-to-end run on the
micro backbone logged to a real SQLite MLflow store."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metastone_lab import probe
from metastone_lab.errors import ConfigError
from metastone_lab.metrics import auroc, best_of_group, within_group_auroc
from metastone_lab.tracking import metric_key


def test_logistic_probe_recovers_a_linear_label_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 16, generator=g)
    direction = torch.randn(16, generator=g)
    y = (x @ direction > 0).long()
    predict = probe.fit_logistic(x[:2000], y[:2000])
    assert auroc(predict(x[2000:]).numpy(), y[2000:].numpy()) > 0.95
    noise = torch.randint(0, 2, (4000,), generator=g)
    predict = probe.fit_logistic(x[:2000], noise[:2000])
    assert 0.42 < auroc(predict(x[2000:]).numpy(), noise[2000:].numpy()) < 0.58
    with pytest.raises(ConfigError, match=r"x must be \(N, C\)"):
        probe.fit_logistic(x[:, 0], y)


def test_within_group_auroc_and_best_of_group():
    # group a: the right sample scores highest; group b: the wrong one does;
    # group c has no wrong sample and does not count
    scores = [0.9, 0.1, 0.2, 0.8, 0.5]
    labels = [1, 0, 1, 0, 1]
    groups = ["a", "a", "b", "b", "c"]
    value, n = within_group_auroc(scores, labels, groups)
    assert n == 2 and value == pytest.approx(0.5)
    assert best_of_group(scores, labels, groups) == pytest.approx(2 / 3)
    # ties count one half
    assert within_group_auroc([0.3, 0.3], [1, 0], [0, 0]) == (0.5, 1)
    assert math.isnan(within_group_auroc([0.3], [1], [0])[0])


def test_probe_config_validation():
    with pytest.raises(ConfigError, match="k must be >= 2"):
        probe.ProbeConfig(k=1)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        probe.ProbeConfig(temperature=0.0)
    with pytest.raises(ConfigError, match="ProbeConfig.prompt_format"):
        probe.ProbeConfig(prompt_format={"shot": 1})
    with pytest.raises(ConfigError, match="unknown prompt style 'fewshot'"):
        probe.ProbeConfig(prompt_format={"style": "fewshot"})


def test_probe_end_to_end_on_micro(mlflow_sqlite):
    import mlflow

    # one worked example in every prompt (the default, unformatted path runs in the
    # micro ablation test's probe step)
    cfg = probe.ProbeConfig(n_train=6, n_test=4, k=4, max_new_tokens=40, layers=(-2, -1),
                            prompt_format={"shots": 1})
    frame = probe.run_and_log("micro", cfg, log=lambda s: None)
    assert list(frame.columns) == probe.COLUMNS
    feats = set(frame.feature)
    assert "policy_logprob" in feats and len(feats) == 3  # two layers + the log-prob row
    for col in ("traj_auroc", "within_auroc", "bon_at_k", "step_auroc"):
        vals = frame[col].dropna()
        assert ((vals >= 0) & (vals <= 1)).all(), col
    assert 0.0 <= frame.attrs["pass@1"] <= frame.attrs["pass@k"] <= 1.0
    assert frame.attrs["n_test_problems"] == 4
    runs = mlflow.search_runs(experiment_names=[probe.PROBE_EXPERIMENT])
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    assert runs.iloc[0]["metrics." + metric_key("pass@1")] == pytest.approx(frame.attrs["pass@1"])
    with pytest.raises(ConfigError, match="out of range"):
        probe.run_and_log("micro", probe.ProbeConfig(n_train=2, n_test=2, k=2,
                                                     max_new_tokens=40, layers=(99,)),
                          log=lambda s: None)
