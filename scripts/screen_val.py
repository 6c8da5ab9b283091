"""Trained-head screen on validation problems: the quickstart recipe with overrides.
docs/testbed.md, section 3.

    python scripts/screen_val.py '{"n_test": 500, "seed": 1}' [dump.pkl]

Trains and evaluates exactly as ``make study`` does (experiments/quickstart.yaml), but on
the ``val`` split (``n_test`` validation problems; the test split is never read), and
prints one line: the overrides, the summary keys of the study and the wall time. With a
second argument, pickles the scored validation samples (a list of ProblemSamples) for
offline analysis (scripts/screen_response_end.py)."""
import json
import pickle
import sys
import time
from pathlib import Path

import yaml

from metastone_lab import study

over = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
spec = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
params = yaml.safe_load(spec.read_text())["parameters"]
params.update(eval_split="val", seed=0)
params.update(over)
cfg = study.load_study_config(params)
t0 = time.time()
model, tok = study.prepare_backbone(cfg)
trained, ev, _ = study.train_and_evaluate(cfg, model, tok)
s = study.summarize(ev, trained, aggregator=cfg.aggregator)
if len(sys.argv) > 2:
    with open(sys.argv[2], "wb") as f:
        pickle.dump(ev.test, f)
keys = ["pass@1", "pass@32", "bon@8", "majority@8", "bon@32", "majority@32", "weighted@32",
        "mean_logprob@32", "self_certainty@32", "deepconf@32", "auroc", "auroc_within",
        "bon_minus_majority@8_ci", "bon_minus_majority@32_ci", "aha_onset_step"]
print("SCREEN", json.dumps(over), json.dumps({k: s.get(k) for k in keys}),
      f"{time.time() - t0:.0f}s")
