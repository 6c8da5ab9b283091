"""Every notebook in notebooks/ is executed by papermill (through the runner,
as a researcher's batch run would) with tiny parameters on a micro backbone,
and its MLflow run is checked for params, metrics and artifacts.

Cost: one micro backbone build (~20-40 s) plus one papermill execution per
notebook (~20-40 s each on 2 cores).
"""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
import yaml

from metastone_lab import runner
from metastone_lab.study import SUMMARY_KEYS
from metastone_lab.tracking import metric_key

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
TRAIN_TINY = {"prompts_per_step": 2, "n": 4, "eval_every": 1, "eval_val_problems": 4,
              "eval_test_problems": 4, "eval_samples": 2}


def test_notebooks_exist():
    names = {p.stem for p in NOTEBOOKS}
    assert {"quickstart", "build_backbone", "train_reflective", "test_time_scaling",
            "ablate", "compare_runs"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_valid_stripped_and_parameterised(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, \
                f"{path.name} is stored with outputs; clear them before committing"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    # papermill must parse every assignment (its parser skips lines it cannot read,
    # e.g. some comments with brackets, and the runner would then refuse the name)
    import re

    import papermill

    assigned = set(re.findall(r"^([A-Za-z_]\w*)\s*=", tagged[0].source, flags=re.M))
    assert set(papermill.inspect_notebook(str(path))) == assigned
    assert any(c.cell_type == "markdown" for c in nb.cells)
    # the notebook is glue: no function or class definitions (logic lives in metastone_lab)
    src = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "\ndef " not in "\n" + src and "\nclass " not in "\n" + src


@pytest.fixture(scope="module")
def micro_backbone(tmp_path_factory) -> str:
    from metastone_lab.backbones import TinyBackboneConfig, build_tiny_backbone

    out = tmp_path_factory.mktemp("backbone") / "micro"
    build_tiny_backbone(TinyBackboneConfig.micro(), out, log=lambda *_: None)
    return str(out)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    home = tmp_path_factory.mktemp("nbstore")
    return {"home": home, "uri": f"sqlite:///{home / 'mlflow.db'}"}


def _study_params(backbone: str) -> dict:
    return {"backbone": backbone, "train_steps": 2, "k_max": 4, "n_test": 4, "n_val": 4,
            "val_k": 2, "max_new_tokens": 40, "train": dict(TRAIN_TINY)}


def _run(store, name, notebook, params, grid=None):
    spec = {"name": name, "notebook": str(REPO / "notebooks" / notebook), "parameters": params}
    if grid:
        spec["grid"] = grid
    path = store["home"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    rep = runner.run_spec(path, root=REPO, runs_dir=store["home"] / "runs",
                          tracking_uri=store["uri"], progress=False)
    failed = {k: r.get("error") for k, r in rep["points"].items() if r["status"] != "ok"}
    assert rep["exit_code"] == 0, f"{name}: points failed: {failed}"
    return rep


def _child_runs(store, experiment):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store["uri"])
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    return client, children


def _artifacts(client, run_id, path=""):
    out = []
    for f in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def _check_run(store, experiment, params, metrics, artifacts):
    client, children = _child_runs(store, experiment)
    assert children, f"no child run in experiment {experiment!r}"
    for run in children:
        assert run.info.status == "FINISHED"
        for p in params:
            assert p in run.data.params, f"param {p!r} missing; have {sorted(run.data.params)}"
        for m in metrics:
            assert metric_key(m) in run.data.metrics, \
                f"metric {m!r} missing; have {sorted(run.data.metrics)}"
        arts = _artifacts(client, run.info.run_id)
        for a in artifacts:
            assert any(x == a or x.endswith("/" + a) or x.startswith(a + "/") for x in arts), \
                f"artifact {a!r} missing; have {arts}"
    return children


def test_quickstart_and_compare_runs(store, micro_backbone):
    rep = _run(store, "nb-quickstart", "quickstart.ipynb", _study_params(micro_backbone))
    summary = rep["summary"]
    assert set(SUMMARY_KEYS) <= set(summary), set(SUMMARY_KEYS) - set(summary)
    for k in ("pass@1", "bon@2", "auroc"):
        assert summary[k] is None or 0.0 <= summary[k] <= 1.0
    assert summary["pass@1"] is not None and summary["wall_seconds"] > 0
    assert summary["pass@32"] is None  # k_max=4: no k=32 column, never a made-up value
    # the kernel reported its loops to the runner (metastone_lab.progress): the last one
    from metastone_lab import progress

    (res,) = rep["points"].values()
    state = progress.read(Path(res["run_dir"]) / "progress.json")
    assert state["phase"] == "sampling" and state["done"] == state["total"] == 4
    _check_run(store, "nb-quickstart",
               params=["backbone", "train_mode", "k_max", "train.mode", "train.head_lr"],
               metrics=["pass@1", "bon@2", "spr_loss"],
               artifacts=["notebook", "summary.json", "training_curves.png", "trajectories.html",
                          "accuracy_vs_k.png", "score_histogram.png", "head/score_module.pt",
                          "head/score_module.safetensors", "adapter/adapter_model.safetensors"])
    # compare_runs reads that experiment back through search_runs
    _run(store, "nb-compare", "compare_runs.ipynb",
         {"experiment": "nb-quickstart", "metrics": ["pass@1", "bon@2"]})
    run_dir = runner.latest_dir(store["home"] / "runs" / "nb-compare" / "default")
    out = nbformat.read(run_dir / "default.ipynb", as_version=4)
    text = json.dumps([c.get("outputs", []) for c in out.cells])
    assert "1 finished runs" in text and "bon@2" in text


def test_build_backbone_notebook(store, monkeypatch, tmp_path):
    monkeypatch.setenv("METASTONE_LAB_CACHE", str(tmp_path / "cache"))
    _run(store, "nb-build", "build_backbone.ipynb",
         {"preset": "micro", "overrides": {"steps": 5, "eval_n": 4, "eval_k": 2}})
    _check_run(store, "nb-build", params=["preset"], metrics=["pass@1", "params"],
               artifacts=["notebook", "sft_curve.png", "pass_at_k.png", "summary.json"])
    assert list((tmp_path / "cache").rglob("COMPLETE")), "the build was not cached"


def test_train_reflective_notebook(store, micro_backbone):
    params = _study_params(micro_backbone)
    params["train"] = {**TRAIN_TINY, "n": 2}
    _run(store, "nb-train", "train_reflective.ipynb", params)
    _check_run(store, "nb-train", params=["train_mode", "train.kl_coef"],
               metrics=["policy_loss", "kl", "spr_loss", "eval_pass1", "pass@1"],
               artifacts=["aha_curves.png", "adapter/adapter_model.safetensors"])


def test_test_time_scaling_notebook(store, micro_backbone):
    _run(store, "nb-tts", "test_time_scaling.ipynb",
         {**_study_params(micro_backbone), "train_mode": "none"})
    _check_run(store, "nb-tts", params=["k_max"], metrics=["bon@2"],
               artifacts=["tts_table.json", "accuracy_vs_k.png", "score_histogram.png",
                          "trajectories.html"])


def test_ablation_notebooks_sweep(store, micro_backbone):
    params = _study_params(micro_backbone)
    params["train_mode"] = "none"   # the sweeps' mechanics, not the head's quality
    _run(store, "nb-seg", "ablate.ipynb", params,
         grid={"segmenter": ["reference", "paragraph"]})
    # (AUROC is undefined when a micro model gets every sample wrong, so only
    # always-defined metrics are required here)
    children = _check_run(store, "nb-seg", params=["segmenter"], metrics=["pass@1", "bon@2"],
                          artifacts=["accuracy_vs_k.png"])
    assert sorted(r.data.params["segmenter"] for r in children) == ["paragraph", "reference"]
    _run(store, "nb-scoring", "ablate.ipynb", {**params, "aggregator": "min"})
    _check_run(store, "nb-scoring", params=["aggregator"], metrics=["pass@1", "bon@2"],
               artifacts=["accuracy_vs_k.png"])


# ------------------------------------------------ one store, wherever a run starts
def test_store_and_runs_resolve_to_the_checkout_from_any_subfolder(tmp_path, monkeypatch):
    from metastone_lab import tracking

    proj = tmp_path / "proj"
    (proj / "notebooks").mkdir(parents=True)
    (proj / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.HOME_ENV, raising=False)
    monkeypatch.chdir(proj / "notebooks")
    assert tracking.project_home() == proj.resolve()
    assert tracking.resolve_tracking_uri() == f"sqlite:///{proj.resolve() / 'mlruns.db'}"
    out = tracking.interactive_output_dir("quickstart.ipynb")
    assert out.parent == proj.resolve() / "runs" / "interactive" / "quickstart"
    bare = tmp_path / "bare"
    bare.mkdir()
    monkeypatch.chdir(bare)                       # no checkout around: the cwd
    assert tracking.project_home() == bare.resolve()
    monkeypatch.setenv(tracking.HOME_ENV, str(proj))  # the override wins
    assert tracking.project_home() == proj.resolve()


def test_interactive_notebook_run_lands_in_the_checkouts_store(tmp_path, monkeypatch,
                                                               micro_backbone):
    """A kernel started in notebooks/ (what JupyterLab does) writes the checkout's
    mlruns.db and runs/, under a readable run name: `make mlflow-ui` shows it beside
    the batch runs."""
    import papermill as pm
    from mlflow.tracking import MlflowClient

    from metastone_lab import tracking

    proj = tmp_path / "proj"
    (proj / "notebooks").mkdir(parents=True)
    (proj / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    nb = proj / "notebooks" / "quickstart.ipynb"
    nb.write_bytes((REPO / "notebooks" / "quickstart.ipynb").read_bytes())
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.HOME_ENV, raising=False)
    pm.execute_notebook(str(nb), str(tmp_path / "executed.ipynb"),
                        parameters=_study_params(micro_backbone), kernel_name="python3",
                        cwd=str(proj / "notebooks"), progress_bar=False)
    assert (proj / "mlruns.db").is_file() and not (proj / "notebooks" / "mlruns.db").exists()
    runs = list((proj / "runs" / "interactive" / "quickstart").iterdir())
    assert len(runs) == 1 and (runs[0] / "summary.json").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlruns.db'}")
    exp = client.get_experiment_by_name("quickstart")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_name.startswith("quickstart 20"), run.info.run_name
