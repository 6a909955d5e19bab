"""The `caption` config section: which captioner, with which prompt and sampling, on how many workers.

One section drives both places captions are made: a stage inside the curation DAG (`pipelines/curate.py`) and the
standalone `pipelines/recaption.py` job. In YAML:

    caption:
      backend: vllm                     # or transformers (small GPUs, CPU); any registered backend
      name: llava                       # manifest column caption_llava, meta captions["llava"]
      model: llava-hf/llava-1.5-7b-hf   # hub id or local folder saved with save_pretrained
      inject_source_caption: false      # true: prompt with `source_prompt`, which quotes the source caption
      sampling: {temperature: 0.2}
      max_new_tokens: 512
      retries: 2                        # attempts after the first, with `retry_sampling`
      batch_size: 16                    # images per call of the captioner (one Ray batch)
      num_gpus: 1                       # per actor (vLLM: set it to engine.tensor_parallel_size)
      concurrency: 4                    # actors
      engine: {max_model_len: 4096, gpu_memory_utilization: 0.9}   # vLLM only

Building the captioner a section describes: `config.build()` (in the worker, e.g. inside a Ray actor), which is
`build_captioner(config.backend, **config.captioner_options())`. The stage fields (batch_size, num_gpus, num_cpus,
concurrency) are for the pipeline that places the workers, not for the captioner.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from curation.captioners.prompts import PAPER_PROMPT, SOURCE_CAPTION_PROMPT
from common.config import StrictModel

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"

# Fields of CaptionStageConfig that place workers; everything else configures the captioner itself.
STAGE_FIELDS = ("backend", "options", "batch_size", "num_gpus", "num_cpus", "concurrency")


class SamplingConfig(StrictModel):
    """Sampling parameters of one generation attempt (the same meaning in transformers and vLLM)."""

    temperature: float = Field(0.2, ge=0.0, description="0 means greedy decoding")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1, description="None: no top-k cut")
    repetition_penalty: float = Field(1.0, gt=0.0)
    seed: int | None = Field(0, description="per-request seed, so a rerun draws the same captions; None: random")


def _default_retry_sampling() -> list[SamplingConfig]:
    # Degenerate outputs (loops, run-on sentences) are mostly a sharp, repetitive distribution: retry hotter and
    # with a growing repetition penalty, each attempt with a fresh seed.
    return [
        SamplingConfig(temperature=0.7, top_p=0.95, repetition_penalty=1.1, seed=1),
        SamplingConfig(temperature=1.0, top_p=0.9, repetition_penalty=1.2, seed=2),
    ]


class QualityConfig(StrictModel):
    """Rules that decide whether a generated caption is kept (see curation.captioners.quality)."""

    strip_openings: bool = Field(True, description='remove boilerplate openings such as "The image shows"')
    min_words: int = Field(3, ge=1)
    require_sentence_end: bool = Field(True, description="a caption that stops mid-sentence is truncated")
    salvage_truncated: bool = Field(
        False, description="keep the complete sentences of a truncated caption instead of failing it")
    max_consecutive_repeats: int = Field(3, ge=1, description="an n-gram (n <= 4) repeated back to back more often is degenerate")
    min_distinct_trigram_ratio: float = Field(0.5, ge=0.0, le=1.0, description="checked on captions of >= 20 words")
    min_alpha_ratio: float = Field(0.6, ge=0.0, le=1.0, description="share of letters among non-space characters")
    reject_refusals: bool = Field(True, description='"I\'m sorry, I cannot ..." is not a caption')


class VLLMEngineConfig(StrictModel):
    """vLLM engine options (`vllm.LLM(...)` keyword arguments); used by the vllm backend only."""

    tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int | None = Field(4096, ge=256)
    max_num_seqs: int = Field(64, ge=1, description="the engine's own batch size (sequences in flight)")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    dtype: str = "auto"
    enforce_eager: bool = False
    extra: dict[str, Any] = Field(default_factory=dict, description="any other vllm.LLM keyword argument")


class CaptionerSettings(StrictModel):
    """What a LLaVA captioner needs; `build_captioner("transformers" | "vllm", **kwargs)` validates its kwargs
    against this model, so a misspelt option fails the same way in a YAML file and in Python."""

    name: str = Field("llava", pattern=r"^[a-z0-9_]{1,40}$", description="caption name: column caption_<name>")
    model: str = Field(DEFAULT_MODEL, min_length=1, description="llava-hf model id or local folder")
    prompt: str = Field(PAPER_PROMPT, min_length=1, description="instruction for every image")
    source_prompt: str = Field(
        SOURCE_CAPTION_PROMPT, description="instruction when the source caption is injected; {caption} marks where")
    inject_source_caption: bool = False
    chat_template: str | None = Field(
        None, description="Jinja chat template overriding the processor's (for checkpoints saved without one)")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    retry_sampling: list[SamplingConfig] = Field(
        default_factory=_default_retry_sampling, min_length=1,
        description="sampling of attempt 2, 3, ...; the last entry repeats when retries outnumber it")
    retries: int = Field(2, ge=0, description="attempts after the first for a caption that fails quality control")
    max_new_tokens: int = Field(512, ge=1, description="the official script allows 512-1024")
    min_new_tokens: int = Field(0, ge=0, description="benchmarks set it to max_new_tokens for a fixed token count")
    quality: QualityConfig = Field(default_factory=QualityConfig)
    # transformers backend
    device: str = Field("auto", description="auto (cuda if present, else cpu), cpu, cuda, cuda:1, ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on GPU, float32 on CPU")
    attn_implementation: str | None = Field(None, description="e.g. sdpa or flash_attention_2; None: library default")
    # vllm backend
    engine: VLLMEngineConfig = Field(default_factory=VLLMEngineConfig)

    @field_validator("source_prompt")
    @classmethod
    def _source_prompt_has_slot(cls, value: str) -> str:
        if "{caption}" not in value:
            raise ValueError("must contain {caption}, where the source caption is inserted")
        return value

    @model_validator(mode="after")
    def _min_tokens_fit(self):
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})")
        return self

    def sampling_schedule(self) -> list[SamplingConfig]:
        """Sampling of attempt 1, 2, ..., 1 + retries."""
        retry = [self.retry_sampling[min(i, len(self.retry_sampling) - 1)] for i in range(self.retries)]
        return [self.sampling, *retry]

    def provenance(self) -> dict:
        """What every LLaVA backend records with each caption; backends add their own engine and versions."""
        return {
            "model": self.model,
            "prompt_template": self.prompt,
            "source_prompt_template": self.source_prompt if self.inject_source_caption else None,
            "chat_template": "config" if self.chat_template else "processor",
            "sampling_schedule": [x.model_dump() for x in self.sampling_schedule()],  # attempt k used entry k - 1
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
        }


class CaptionStageConfig(CaptionerSettings):
    """The `caption` section: a captioner (CaptionerSettings) plus where and how wide it runs."""

    backend: str = Field("transformers", description="a registered captioner backend: transformers, vllm, ...")
    options: dict[str, Any] = Field(
        default_factory=dict, description="extra keyword arguments for the backend factory (other backends' settings)")
    batch_size: int = Field(8, ge=1, description="images per captioner call (one Ray batch)")
    num_gpus: Annotated[float, Field(ge=0.0)] | Literal["auto"] = Field(
        "auto", description="GPUs per captioning actor; 0 runs it on CPU; auto: 1 when the cluster has GPUs, else 0")
    num_cpus: Annotated[float, Field(gt=0.0)] | Literal["auto"] = Field(
        "auto", description="CPUs per captioning actor; auto: 1, or a share of a small machine")
    concurrency: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="captioning actors; auto: up to one per GPU, one on CPU")

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        from curation.captioners.base import _BACKENDS

        if value not in _BACKENDS:
            raise ValueError(f"unknown captioner backend {value!r}; known: {sorted(_BACKENDS)}")
        return value

    def captioner_options(self) -> dict[str, Any]:
        """Keyword arguments for `build_captioner(self.backend, ...)`: the name, the captioner settings the config
        sets explicitly (a backend applies its own defaults to the rest), then `options`."""
        chosen = self.model_dump(exclude_unset=True, exclude=set(STAGE_FIELDS))
        return {**chosen, "name": self.name, **self.options}

    def build(self):
        """The captioner this section describes; call it where it runs (in the worker, not the driver)."""
        from curation.captioners.base import build_captioner

        return build_captioner(self.backend, **self.captioner_options())
