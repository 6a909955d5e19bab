"""The vLLM backend's request building and response parsing, against a fake engine with vLLM's interface:
`LLM.generate(prompts, sampling_params, *, use_tqdm)` returning RequestOutput-shaped objects whose `outputs` hold
CompletionOutput-shaped ones, and a SamplingParams that keeps its keyword arguments."""
from __future__ import annotations

import types
from dataclasses import dataclass, field

import pytest
from PIL import Image

from curation.captioners import build_captioner
from curation.captioners import llava_vllm
from tests.llava_fixtures import save_random_llava
from curation.captioners.llava_vllm import MissingExtraError
from curation.captioners.prompts import PAPER_PROMPT
from common.config import ConfigError

GOOD = "The image shows a red ball on a wooden table. The wood is light oak and the ball is glossy."
CLEAN = "A red ball on a wooden table. The wood is light oak and the ball is glossy."


class FakeSamplingParams:
    """vllm.SamplingParams stand-in: keeps what it was given."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs


@dataclass
class FakeCompletionOutput:  # vllm.outputs.CompletionOutput
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: None = None
    finish_reason: str | None = "stop"
    stop_reason: int | str | None = None


@dataclass
class FakeRequestOutput:  # vllm.outputs.RequestOutput
    request_id: str
    prompt: str
    prompt_token_ids: list[int]
    prompt_logprobs: None
    outputs: list[FakeCompletionOutput]
    finished: bool = True


@dataclass
class FakeLLM:
    """Answers each request from a script: a function of (request index in this call, call number, prompt)."""

    script: object
    calls: list = field(default_factory=list)
    init_kwargs: dict = field(default_factory=dict)

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None):
        self.calls.append((prompts, sampling_params))
        outputs = []
        for i, request in enumerate(prompts):
            text, finish = self.script(i, len(self.calls), request["prompt"])
            tokens = list(range(len(text.split()) + 1))
            outputs.append(FakeRequestOutput(str(i), request["prompt"], [1, 2, 3], None,
                                             [FakeCompletionOutput(0, text, tokens, finish_reason=finish)]))
        return outputs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_random_llava(tmp_path_factory.mktemp("tiny_llava"), "tiny")


@pytest.fixture
def fake_vllm(monkeypatch):
    """build_captioner("vllm", ...) with the fake standing in for the vllm module."""
    engines = []

    def llm(**kwargs):
        engine = FakeLLM(script=lambda i, call, prompt: (GOOD, "stop"), init_kwargs=kwargs)
        engines.append(engine)
        return engine

    module = types.SimpleNamespace(LLM=llm, SamplingParams=FakeSamplingParams, __version__="0.0-fake")
    monkeypatch.setattr(llava_vllm, "import_vllm", lambda: module)
    return engines


def _images(photos_dir, n):
    return [Image.open(p) for p in sorted(photos_dir.glob("*.jpg"))[:n]]


def test_builds_engine_from_config_and_captions(fake_vllm, model_dir, photos_dir):
    captioner = build_captioner("vllm", model=str(model_dir), max_new_tokens=77,
                                engine={"tensor_parallel_size": 2, "max_model_len": 2048, "max_num_seqs": 32,
                                        "gpu_memory_utilization": 0.8, "extra": {"swap_space": 4}})
    engine = fake_vllm[0]
    assert engine.init_kwargs == {
        "model": str(model_dir), "tensor_parallel_size": 2, "max_model_len": 2048, "max_num_seqs": 32,
        "gpu_memory_utilization": 0.8, "dtype": "auto", "enforce_eager": False, "limit_mm_per_prompt": {"image": 1},
        "swap_space": 4,
    }
    images = _images(photos_dir, 3)
    results = captioner(images, [None] * 3, [{}] * 3)
    assert [(r.text, r.ok, r.attempts) for r in results] == [(CLEAN, True, 1)] * 3
    [(requests, params)] = engine.calls
    # the chat template of the model's own processor, with the paper's prompt; the image as multi-modal data
    assert [r["prompt"] for r in requests] == [f"USER: <image>\n{PAPER_PROMPT} ASSISTANT:"] * 3
    assert [r["multi_modal_data"]["image"].size for r in requests] == [im.size for im in images]
    assert all(r["multi_modal_data"]["image"].mode == "RGB" for r in requests)
    assert [p.kwargs for p in params] == [dict(temperature=0.2, top_p=1.0, repetition_penalty=1.0, max_tokens=77,
                                               min_tokens=0, n=1, seed=0)] * 3
    assert captioner.tokens_generated == 3 * (len(GOOD.split()) + 1)
    provenance = captioner.provenance()
    assert provenance["backend"] == "vllm" and provenance["model"] == str(model_dir)
    assert provenance["prompt_template"] == PAPER_PROMPT and provenance["vllm"] == "0.0-fake"


def _captioner(model_dir, script, **options):
    from transformers import AutoProcessor

    from curation.captioners.config import CaptionerSettings

    settings = CaptionerSettings(model=str(model_dir), **options)
    engine = FakeLLM(script=script)
    processor = AutoProcessor.from_pretrained(model_dir)
    return llava_vllm.LlavaVLLMCaptioner(settings, engine, FakeSamplingParams, processor, "llava"), engine


def test_retries_failures_with_the_retry_sampling(model_dir, photos_dir):
    def script(i, call, prompt):
        if call == 1:  # first pass: image 0 fine, image 1 cut at the limit, image 2 loops
            return [(GOOD, "stop"), ("A red ball on a wooden table and a", "length"),
                    ("a ball a ball a ball a ball a ball.", "stop")][i]
        return GOOD, "stop"

    captioner, engine = _captioner(model_dir, script, retries=2, max_new_tokens=50,
                                   retry_sampling=[{"temperature": 0.9, "top_k": 40, "seed": 7}])
    results = captioner(_images(photos_dir, 3), [None] * 3, [{}] * 3)
    assert [(r.ok, r.attempts) for r in results] == [(True, 1), (True, 2), (True, 2)]
    assert len(engine.calls) == 2
    retried_requests, retried_params = engine.calls[1]
    assert len(retried_requests) == 2  # only the two failures go again
    assert retried_params[0].kwargs == dict(temperature=0.9, top_p=1.0, repetition_penalty=1.0, max_tokens=50,
                                            min_tokens=0, n=1, top_k=40, seed=7)


def test_records_failure_reasons_after_the_last_attempt(model_dir, photos_dir):
    def script(i, call, prompt):
        return [("A red ball on a wooden table and a", "length"), ("", "stop"), ("ignored", "abort")][i]

    captioner, engine = _captioner(model_dir, script, retries=1)
    results = captioner(_images(photos_dir, 3), [None] * 3, [{}] * 3)
    assert [(r.ok, r.reason, r.attempts) for r in results] == [
        (False, "truncated", 2), (False, "empty", 2), (False, "error: generation finished with 'abort'", 2)]
    assert len(engine.calls) == 2


def test_source_caption_is_quoted_in_the_request(model_dir, photos_dir):
    captioner, engine = _captioner(model_dir, lambda i, call, prompt: (GOOD, "stop"), inject_source_caption=True)
    captioner(_images(photos_dir, 2), ['two "happy" dogs', None], [{}, {}])
    prompts = [r["prompt"] for r in engine.calls[0][0]]
    assert prompts == [
        "USER: <image>\nGiven the caption of this image \"two 'happy' dogs\", describe this image in a very "
        "detailed manner ASSISTANT:",
        f"USER: <image>\n{PAPER_PROMPT} ASSISTANT:",
    ]


def test_parse_output_shapes():
    parse = llava_vllm.parse_output
    ok = parse(FakeRequestOutput("0", "p", [], None, [FakeCompletionOutput(0, "A cat.", [5, 6, 7], finish_reason="stop")]))
    assert (ok.text, ok.hit_token_limit, ok.num_tokens, ok.error) == ("A cat.", False, 3, None)
    cut = parse(FakeRequestOutput("0", "p", [], None, [FakeCompletionOutput(0, "A cat", [5, 6], finish_reason="length")]))
    assert cut.hit_token_limit and cut.num_tokens == 2
    assert parse(FakeRequestOutput("0", "p", [], None, [])).error == "error: engine returned no completion"


def test_without_vllm_the_backend_names_the_extra(model_dir):
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed here")
    except ImportError:
        pass
    with pytest.raises(MissingExtraError, match=r"\.\[vllm\]"):
        build_captioner("vllm", model=str(model_dir))
    # a bad option is reported before the missing extra: config errors come first
    with pytest.raises(ConfigError, match="engine.tensor_parallel_size"):
        build_captioner("vllm", engine={"tensor_parallel_size": 0})
