"""LLaVA captioning with vLLM: the throughput backend for GPU workers.

One `vllm.LLM` engine per worker (a Ray actor holding `num_gpus = engine.tensor_parallel_size` GPUs). Each call
sends the batch as one `generate()` request list; the engine schedules it with continuous batching
(`engine.max_num_seqs` sequences in flight), so the Ray batch size only needs to be large enough to keep it fed.
Every request carries its own seed, so a caption does not depend on which batch its image landed in.

Why an engine per actor rather than `ray.data.llm`'s processor: captions need per-image quality control with
retries under other sampling parameters, and the same Captioner object must also run as a stage inside the
curation DAG; a Captioner that owns its engine does both, and is what `build_captioner("vllm", ...)` returns.

vLLM is an optional extra (`pip install '.[vllm]'`) and is imported only when this backend is built.
"""
from __future__ import annotations

from typing import Any

from PIL import Image

from curation.captioners.base import CaptionResult, Captioner
from curation.captioners.config import CaptionerSettings, SamplingConfig
from curation.captioners.prompts import build_instruction, render_chat_prompt
from curation.captioners.quality import Generation, caption_with_retries
from common.pretrained import _load

SETTING = "caption.model"


class MissingExtraError(ImportError):
    """An optional dependency that a chosen backend needs is not installed; the message says how to install it."""


def import_vllm():
    try:
        import vllm
    except ImportError as err:
        raise MissingExtraError(
            f"the vllm captioner backend needs vLLM, which is not installed ({err}). Install the optional extra: "
            "pip install '.[vllm]' (or pip install 'pixart-from-scratch[vllm]'); on a Ray cluster, put vllm in the "
            "GPU workers' runtime_env. Or set caption.backend: transformers."
        ) from None
    return vllm


def engine_kwargs(settings: CaptionerSettings) -> dict[str, Any]:
    """`vllm.LLM(...)` keyword arguments from the config."""
    e = settings.engine
    kwargs = dict(
        model=settings.model, tensor_parallel_size=e.tensor_parallel_size, max_num_seqs=e.max_num_seqs,
        gpu_memory_utilization=e.gpu_memory_utilization, dtype=e.dtype, enforce_eager=e.enforce_eager,
        limit_mm_per_prompt={"image": 1},
    )
    if e.max_model_len is not None:
        kwargs["max_model_len"] = e.max_model_len
    return {**kwargs, **e.extra}


def sampling_params(sampling_cls, sampling: SamplingConfig, max_tokens: int, min_tokens: int, request_seed: int | None):
    """A vLLM SamplingParams for one request (temperature 0 is greedy, as in vLLM itself)."""
    kwargs: dict[str, Any] = dict(temperature=sampling.temperature, top_p=sampling.top_p,
                                  repetition_penalty=sampling.repetition_penalty, max_tokens=max_tokens,
                                  min_tokens=min_tokens, n=1)
    if sampling.top_k is not None:
        kwargs["top_k"] = sampling.top_k
    if request_seed is not None:
        kwargs["seed"] = request_seed
    return sampling_cls(**kwargs)


def parse_output(request_output) -> Generation:
    """A vLLM RequestOutput (one completion) -> Generation; an aborted or empty request becomes an error."""
    completions = getattr(request_output, "outputs", None) or []
    if not completions:
        return Generation("", False, error="error: engine returned no completion")
    completion = completions[0]
    if completion.finish_reason not in ("stop", "length"):
        return Generation("", False, error=f"error: generation finished with {completion.finish_reason!r}")
    return Generation(text=completion.text, hit_token_limit=completion.finish_reason == "length",
                      num_tokens=len(completion.token_ids))


class LlavaVLLMCaptioner(Captioner):
    """A vLLM engine serving a LLaVA checkpoint; `engine` needs vllm.LLM's `generate(prompts, sampling_params)`."""

    def __init__(self, settings: CaptionerSettings, engine, sampling_params_cls, processor, model_type: str,
                 vllm_version: str = "unknown"):
        self.settings = settings
        self.name = settings.name
        self.engine = engine
        self.sampling_params_cls = sampling_params_cls
        self.processor = processor  # only for the chat template: vLLM preprocesses the pixels itself
        self.model_type = model_type
        self.vllm_version = vllm_version
        self.tokens_generated = 0

    def provenance(self) -> dict:
        s = self.settings
        return {
            "backend": "vllm",
            **s.provenance(),
            "model_type": self.model_type,
            "dtype": s.engine.dtype,
            "vllm": self.vllm_version,
        }

    def requests_for(self, images: list[Image.Image], source_captions: list[str | None]) -> list[dict]:
        """vLLM prompt dicts: the chat-formatted text with its image as multi-modal data."""
        s = self.settings
        return [
            {"prompt": render_chat_prompt(self.processor,
                                          build_instruction(s.prompt, s.source_prompt, s.inject_source_caption, c),
                                          self.model_type, s.chat_template),
             "multi_modal_data": {"image": image}}
            for image, c in zip(images, source_captions)
        ]

    def generate(self, requests: list[dict], sampling: SamplingConfig) -> list[Generation]:
        s = self.settings
        params = [
            sampling_params(self.sampling_params_cls, sampling, s.max_new_tokens, s.min_new_tokens,
                            sampling.seed)
            for _ in requests
        ]
        outputs = self.engine.generate(requests, params, use_tqdm=False)
        if len(outputs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} requests")
        generations = [parse_output(o) for o in outputs]
        self.tokens_generated += sum(g.num_tokens for g in generations)
        return generations

    def __call__(self, images: list[Image.Image], source_captions: list[str | None], metas: list[dict]) -> list[CaptionResult]:
        requests = self.requests_for([image.convert("RGB") for image in images], source_captions)

        def attempt(indices: list[int], sampling: SamplingConfig) -> list[Generation]:
            return self.generate([requests[i] for i in indices], sampling)

        return caption_with_retries(len(images), attempt, self.settings.sampling_schedule(), self.settings.quality)


def build_vllm_captioner(**options) -> LlavaVLLMCaptioner:
    """The `vllm` backend: options are CaptionerSettings fields (engine options under `engine`)."""
    from transformers import AutoConfig, AutoProcessor

    from common.config import validate_config

    settings = validate_config(options, CaptionerSettings, "vllm captioner options")
    vllm = import_vllm()  # fail before loading anything else
    processor = _load(AutoProcessor.from_pretrained, settings.model, "LLaVA processor", SETTING)
    model_type = _load(AutoConfig.from_pretrained, settings.model, "LLaVA config", SETTING).model_type
    engine = vllm.LLM(**engine_kwargs(settings))
    return LlavaVLLMCaptioner(settings, engine, vllm.SamplingParams, processor, model_type,
                              getattr(vllm, "__version__", "unknown"))
