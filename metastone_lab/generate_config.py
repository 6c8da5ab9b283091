"""The configuration of best-of-N sampling with in-flight scoring (:class:`GenerateConfig`)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from .config import check, composes, from_dict, subconfig
from .config_tree import SamplingConfig, StepsConfig

DEFAULT_EFFORT_MAP = {"low": 2, "medium": 8, "high": 32}
#: the batched engine's rows per decode batch when ``max_batch_rows`` is None (measured on
#: SmolLM2-135M, 16 problems x k=8, 16 tokens, 1 thread: 32 rows 15.4 s, 64 rows 13.6 s,
#: 128 rows 12.5 s process CPU time, medians of 3 interleaved runs)
DEFAULT_BATCH_ROWS = 128


@composes
@dataclass
class GenerateConfig:
    """Best-of-N sampling and in-flight scoring.

    ``k`` samples per problem (or ``effort`` in ``effort_map``: low/medium/high =
    2/8/32 by default; giving both with different values is an error).
    ``sampling`` (:class:`~metastone_lab.config_tree.SamplingConfig`: temperature,
    top_p, max_new_tokens, seed; flat names work) and ``segmentation``
    (:class:`~metastone_lab.config_tree.StepsConfig`: segmenter, segmenter_options,
    read_at, aggregator) are the sub-configs the study and trainer pass in. Their
    defaults are the study's (temperature 0.8, top_p 1.0, max_new_tokens 64); before
    the config tree GenerateConfig had its own (0.6, 0.95, 256): set those explicitly
    for the old behaviour. ``temperature == 0`` is greedy (all k samples identical:
    warned when k > 1); < 0 is an error.
    ``chunk_size`` rows are decoded at once (0 = all k). ``segmentation`` and
    ``span`` go to ``steps.step_mask``.
    ``aggregators``: trajectory scores to compute (None = all of
    ``scoring.AGGREGATORS``). ``score``: False disables in-flight scoring
    (benchmark baseline). ``ignore_eos``: always decode ``max_new_tokens``
    (benchmarks). ``head_mode``: ``"per_step"`` applies the head to every new
    position as it is decoded (keeps a (rows, L) logit tensor); ``"deferred"``
    keeps the feature-layer hidden state of every position (rows, L, C) and, once
    the rows are finished, applies the head only where the step mask is True
    (no second forward either way; cheapest); ``"auto"`` = deferred when the
    feature buffer of a chunk fits in ``feature_buffer_mb``, else per_step.

    ``token_stats``: capture per-token self-signals during decoding (log-prob,
    self-certainty, DeepConf confidence of every sampled token, from the raw
    logits already at hand; see :func:`token_stats`). ``None`` (default) = on
    whenever ``score`` is on, so the unscored benchmark baseline stays bare; set
    True to get them without scoring too. ``deepconf_topk``: k of the DeepConf
    token confidence (the paper's 20). ``deepconf_window``: its sliding-window
    group size in tokens (the paper's 2048, scaled to our ~30-60 token responses).
    """

    k: int | None = None
    sampling: SamplingConfig = subconfig(SamplingConfig)
    chunk_size: int = 32
    segmentation: StepsConfig = subconfig(StepsConfig)
    span: str = "inference"
    aggregators: list[str] | None = None
    effort: str | None = None
    effort_map: dict = field(default_factory=lambda: dict(DEFAULT_EFFORT_MAP))
    score: bool = True
    ignore_eos: bool = False
    head_mode: str = "auto"
    feature_buffer_mb: float = 256.0
    token_stats: bool | None = None
    deepconf_topk: int = 20
    deepconf_window: int = 16
    #: rows decoded together by the batched engine (engine.py): the k rows of as many
    #: problems as fit (each problem's rows stay in one batch); None = max(DEFAULT_BATCH_ROWS,
    #: k); 0 = one problem at a time, in chunks of ``chunk_size`` (the per-problem path)
    max_batch_rows: int | None = None
    #: refill the engine's batch as rows end (continuous batching, engine.decode_stream):
    #: a waiting problem joins as soon as there is room for its k rows. False: fixed
    #: batches of whole problems, each decoded to its last row (the same tokens; floats
    #: then depend only on the batch a problem is planned into, so a shard of whole
    #: batches reproduces a single process bit for bit)
    continuous_batching: bool = True
    #: prompt positions per prefill forward (prefix_cache.py): full blocks shared with an
    #: earlier prompt of the call (a few-shot or chat prefix) are computed once; 0 = one
    #: forward per prompt, nothing shared
    prefill_block: int = 64
    #: where the engine runs the model: "auto" (CUDA when present, else where it is),
    #: "cpu" or "cuda"
    device: str = "auto"
    #: the engine's model dtype: None (as loaded), "float32", "bfloat16" or "float16"
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.effort is not None:
            check(self.effort in self.effort_map,
                  f"GenerateConfig.effort: {self.effort!r} is not in effort_map "
                  f"{sorted(self.effort_map)}; choose one of them or add it to effort_map")
            mapped = self.effort_map[self.effort]
            check(isinstance(mapped, int) and not isinstance(mapped, bool),
                  f"GenerateConfig.effort_map[{self.effort!r}] must be an int, got {mapped!r}")
            check(self.k is None or self.k == mapped,
                  f"GenerateConfig: k={self.k} contradicts effort={self.effort!r} "
                  f"(= k {mapped}); give only one of k and effort")
            self.k = mapped
        if self.k is None:
            self.k = 8
        check(self.k >= 1, f"GenerateConfig.k must be >= 1, got {self.k}; use k=1 for a single sample")
        self.sampling.check("GenerateConfig", greedy_ok=True)
        check(self.chunk_size >= 0,
              f"GenerateConfig.chunk_size must be >= 0 (0 = all k at once), got {self.chunk_size}")
        check(self.head_mode in ("auto", "per_step", "deferred"),
              f"GenerateConfig.head_mode must be auto, per_step or deferred, got {self.head_mode!r}")
        check(isinstance(self.prefill_block, int) and self.prefill_block >= 0,
              f"GenerateConfig.prefill_block must be an int >= 0 (0 = one forward per "
              f"prompt), got {self.prefill_block!r}")
        check(self.deepconf_topk >= 1,
              f"GenerateConfig.deepconf_topk must be >= 1, got {self.deepconf_topk}")
        check(self.deepconf_window >= 1,
              f"GenerateConfig.deepconf_window must be >= 1, got {self.deepconf_window}")
        check(self.span in ("inference", "train"),
              f"GenerateConfig.span must be 'inference' or 'train', got {self.span!r}")
        self.segmentation.check("GenerateConfig", span=self.span)
        check(self.max_batch_rows is None or (isinstance(self.max_batch_rows, int)
                                               and self.max_batch_rows >= 0),
              f"GenerateConfig.max_batch_rows must be an int >= 0 (0 = one problem per "
              f"batch) or null (auto), got {self.max_batch_rows!r}")
        check(self.max_batch_rows is None or self.max_batch_rows == 0 or self.max_batch_rows >= self.k,
              f"GenerateConfig.max_batch_rows={self.max_batch_rows} is smaller than one "
              f"problem's k={self.k} rows (a problem's rows share one batch); set "
              f"max_batch_rows >= {self.k}, or 0 for one problem per batch")
        check(isinstance(self.continuous_batching, bool),
              f"GenerateConfig.continuous_batching must be true or false, got "
              f"{self.continuous_batching!r}")
        check(self.device in ("auto", "cpu", "cuda"),
              f"GenerateConfig.device must be auto, cpu or cuda, got {self.device!r}")
        check(self.dtype in (None, "float32", "bfloat16", "float16"),
              f"GenerateConfig.dtype must be float32, bfloat16, float16 or null, got "
              f"{self.dtype!r}")
        if self.temperature <= 0 and self.k > 1:
            warnings.warn(
                f"GenerateConfig: temperature={self.temperature} <= 0 is greedy decoding, so all "
                f"k={self.k} samples are identical; set temperature > 0 (e.g. 0.8) for best-of-N",
                UserWarning, stacklevel=3,
            )

    @property
    def capture_token_stats(self) -> bool:
        """Whether decoding records per-token stats (``token_stats``, None = ``score``)."""
        return bool(self.score if self.token_stats is None else self.token_stats)

    @property
    def rows_per_chunk(self) -> int:
        return self.k if self.chunk_size == 0 else min(self.chunk_size, self.k)

    @property
    def batch_rows(self) -> int:
        """Rows per batch of the batched engine (0 = the per-problem path)."""
        if self.max_batch_rows is None:
            return max(DEFAULT_BATCH_ROWS, self.k)
        return self.max_batch_rows

    @classmethod
    def from_dict(cls, data: dict | None) -> "GenerateConfig":
        return from_dict(cls, data)


__all__ = ["GenerateConfig", "DEFAULT_EFFORT_MAP"]
