"""One spelling per selector: the names of the summary table (``bon@8``), used by the
plots, the trajectory view and the report. In MLflow a summary key is stored with
``tracking.metric_key`` (``bon@8`` -> ``bon_at_8``); the selector registry
(:mod:`metastone_lab.select`) keeps its descriptive names, mapped here."""
from __future__ import annotations

#: selector registry name -> the summary's name
SELECTOR_NAMES = {
    "sprm_bon": "bon",                       # best-of-N by the SPRM trajectory score
    "majority": "majority",                  # majority vote over final answers
    "sprm_weighted_vote": "weighted",        # vote weighted by the SPRM score
    "last_step": "last_step",                # best-of-N by the last step's score only
    "mean_logprob_bon": "mean_logprob",      # best-of-N by mean token log-prob
    "self_certainty_bon": "self_certainty",  # best-of-N by self-certainty (Kang et al. 2025)
    "deepconf_bon": "deepconf",              # best-of-N by lowest group confidence (Fu et al.)
    "mean_logprob_vote": "mean_logprob_vote",
    "self_certainty_vote": "self_certainty_vote",
    "deepconf_vote": "deepconf_vote",
    "random": "random",                      # a random pick (= pass@1 in expectation)
    "oracle": "oracle",                      # the first correct sample (= pass@k)
    "pass@k": "pass",                        # the unbiased pass@k estimator
}


def display(selector: str) -> str:
    """The summary's name of a selector (unknown names are returned as they are)."""
    return SELECTOR_NAMES.get(selector, selector)


__all__ = ["SELECTOR_NAMES", "display"]
