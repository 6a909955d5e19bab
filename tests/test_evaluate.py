"""`python -m training.evaluate`: FID and CLIP score of a tiny weights folder, with the real torchmetrics math on a
tiny feature extractor and a tiny random CLIP saved and loaded, checked against the formulas computed here."""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch import nn

from tests.test_sample_cli import save_weights
from training.evaluate import build_metrics, main, score

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyFeatures(nn.Module):
    """uint8 [N, 3, H, W] -> [N, 6]: a fixed random conv and pooling (a stand-in for Inception in tests)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, kernel_size=8, stride=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x.float() / 255.0)).mean(dim=(2, 3)).double()


def tiny_features() -> nn.Module:
    return TinyFeatures()


def save_tiny_clip(folder):
    """A random-init CLIPModel with a character-level CLIP tokenizer (a vocab of single characters, no merges)."""
    from transformers import (CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTextConfig,
                              CLIPTokenizer, CLIPVisionConfig)

    chars = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: 2 + i for i, c in enumerate(chars)},
             **{c + "</w>": 28 + i for i, c in enumerate(chars)}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                       pad_token_id=1).to_dict(),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         image_size=32, patch_size=8).to_dict(), projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_vae_dir, tiny_t5_dir):
    root = tmp_path_factory.mktemp("eval")
    weights = save_weights(root / "weights", "tiny", tiny_vae_dir, tiny_t5_dir)
    reference = root / "reference"
    reference.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(reference / f"{i}.png")
    (root / "prompts.txt").write_text("a red bus\na bowl of ramen\n# skipped\na dog\n")
    return root, weights, reference, save_tiny_clip(root / "clip")


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real))


def test_scores_are_the_formulas(setup):
    root, _, reference, clip_dir = setup
    from transformers import CLIPModel, CLIPProcessor

    from training.evaluate import read_reference, to_uint8_batch

    files = read_reference(reference)
    metrics = build_metrics(files, "tests.test_evaluate:tiny_features", clip_model=str(clip_dir), fid_size=64,
                            progress=False)
    rng = np.random.default_rng(1)
    fakes = [Image.fromarray(rng.integers(0, 128, (64, 64, 3), dtype=np.uint8)) for _ in range(5)]
    prompts = ["a red bus", "a dog", "a cat", "a red bus", "ramen"]
    got = score(metrics, fakes, prompts)
    extractor = TinyFeatures()
    with torch.no_grad():
        real = extractor(to_uint8_batch([Image.open(f) for f in files], 64)).numpy()
        fake = extractor(to_uint8_batch(fakes, 64)).numpy()
    assert got["fid"] == pytest.approx(frechet(real, fake), rel=1e-3, abs=1e-6)
    model, processor = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    want = []
    for image, prompt in zip(fakes, prompts):
        inputs = processor(text=[prompt], images=[image], return_tensors="pt", padding=True)
        with torch.no_grad():  # the projections of the towers' pooled outputs, by hand
            i = model.visual_projection(model.vision_model(pixel_values=inputs.pixel_values).pooler_output)
            t = model.text_projection(model.text_model(input_ids=inputs.input_ids,
                                                       attention_mask=inputs.attention_mask).pooler_output)
        want.append(max(100 * torch.nn.functional.cosine_similarity(i, t).item(), 0.0))
    np.testing.assert_allclose(got["clip_per_image"], want, rtol=1e-3, atol=1e-3)
    assert got["clip_score"] == pytest.approx(np.mean(want), abs=1e-3)
    again = score(metrics, fakes[:2] + fakes[:2], prompts[:4])  # the reference features are kept between calls
    assert again["num_reference"] == 6 and np.isfinite(again["fid"])


def test_cli_end_to_end(setup, tmp_path, capsys):
    root, weights, reference, clip_dir = setup
    out = tmp_path / "eval"
    record = main(["--checkpoint", str(weights), "--prompt-file", str(root / "prompts.txt"), "--reference",
                   str(reference), "--out", str(out), "--clip-model", str(clip_dir), "--fid-features",
                   "tests.test_evaluate:tiny_features", "--fid-size", "64", "--images-per-prompt", "2",
                   "--steps", "2", "--height", "32", "--width", "32"])
    saved = json.loads((out / "eval.json").read_text())
    assert saved["num_images"] == 6 and saved["prompts"][:2] == ["a red bus"] * 2
    assert np.isfinite(saved["fid"]) and saved["fid"] == record["fid"] and 0 <= saved["clip_score"] <= 100
    assert (out / "eval.png").stat().st_size > 0 and len(list((out / "samples").glob("*.png"))) == 6
    assert "fid" in capsys.readouterr().out


@pytest.mark.parametrize("extra, needle", [
    (["--clip-model", "/nonexistent/clip"], "--clip-model"),
    (["--fid-features", "nope"], "--fid-features"),
])
def test_missing_models_are_one_line_errors_naming_the_setting(setup, tmp_path, capsys, extra, needle):
    root, weights, reference, clip_dir = setup
    base = ["--checkpoint", str(weights), "--prompt-file", str(root / "prompts.txt"), "--reference", str(reference),
            "--out", str(tmp_path / "e"), "--fid-features", "tests.test_evaluate:tiny_features"]
    with pytest.raises(SystemExit) as exit_:
        main(base + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and needle in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "e").exists()


def test_the_standard_inception_without_torch_fidelity_or_weights_names_the_setting(setup, tmp_path, capsys):
    root, weights, reference, clip_dir = setup
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(weights), "--prompt-file", str(root / "prompts.txt"), "--reference",
              str(reference), "--out", str(tmp_path / "e"), "--clip-model", "none"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--fid-features" in last or "--inception-weights" in last
