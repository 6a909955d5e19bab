import json

import numpy as np
import pytest
import torch

from curation.encoders import CaptionStage, T5Stage, VaeStage
from common.pretrained import MissingModelError
from curation.writer import sample_row
from common.config import validate_config
from pipelines.curate import CaptionConfig, CurateConfig
from tests.conftest import TINY_T5_WIDTH
from tests.fixtures_data import gradient


def batch_of(rows: list[dict]) -> dict:
    return {name: [row[name] for row in rows] for name in rows[0]}


def meta(key, bucket=None, captions=None, **extra):
    return {"key": key, "source": "t", "source_id": key, "bucket": bucket, "captions": captions or {}, **extra}


def picture(h, w, seed):
    return np.asarray(gradient(h, w, seed=seed))


def test_vae_stage_matches_diffusers_encode(tiny_vae_dir):
    from diffusers import AutoencoderKL

    rows = [sample_row("a", "u", meta("a", [64, 64]), image=picture(64, 64, 1)),
            sample_row("b", "u", meta("b", [48, 80]), image=picture(48, 80, 2)),
            sample_row("c", "u", meta("c"), reject_stage="decode", reject_reason="broken"),
            sample_row("d", "u", meta("d", [64, 64]), image=picture(64, 64, 3))]
    out = VaeStage(str(tiny_vae_dir), device="cpu")(batch_of(rows))
    assert "image" not in out and list(out["reject_stage"]) == ["", "", "decode", ""]
    reference = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    for i, row in enumerate(rows):
        if row["reject_stage"]:
            assert out["latent_mean"][i].size == 0
            continue
        x = torch.from_numpy(row["image"].copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            posterior = reference.encode(x).latent_dist
        mean, std = out["latent_mean"][i], out["latent_std"][i]
        assert mean.dtype == np.float16 and std.dtype == np.float16
        np.testing.assert_allclose(mean, posterior.mean[0].numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(std, posterior.std[0].numpy(), rtol=2e-3, atol=2e-3)
        bucket = json.loads(row["meta"])["bucket"]
        assert json.loads(out["meta"][i])["latent_hw"] == [bucket[0] // 8, bucket[1] // 8] == list(mean.shape[1:])


def test_vae_stage_rejects_buckets_the_vae_cannot_divide(tiny_vae_dir):
    rows = [sample_row("a", "u", meta("a", [60, 60]), image=picture(60, 60, 1))]
    out = VaeStage(str(tiny_vae_dir), device="cpu")(batch_of(rows))
    assert out["reject_stage"][0] == "vae" and "not divisible" in out["reject_reason"][0]


def test_t5_stage_stores_only_valid_tokens(tiny_t5_dir):
    from common.pretrained import load_text_encoder

    captions = [{"dense": "a red circle", "sparse": "red"}, {"dense": "x" * 500, "sparse": "y"},
                {"sparse": "no dense caption"}, {"dense": "   ", "sparse": "blank dense"}]
    rows = [sample_row(f"k{i}", "u", meta(f"k{i}", captions=c)) for i, c in enumerate(captions)]
    rows.append(sample_row("dead", "u", meta("dead"), reject_stage="vae", reject_reason="nan"))
    out = T5Stage(str(tiny_t5_dir), ["dense", "sparse"], device="cpu")(batch_of(rows))
    assert list(out["reject_stage"]) == ["", "", "t5", "t5", "vae"]
    assert "no caption 'dense'" in out["reject_reason"][2] and "is empty" in out["reject_reason"][3]
    reference = load_text_encoder(str(tiny_t5_dir))
    for i in (0, 1):
        tokens = json.loads(out["meta"][i])["t5_tokens"]
        for name in ("dense", "sparse"):
            features, mask = reference.encode([captions[i][name]])
            n = int(mask.sum())
            # ByT5: one token per byte plus </s>, truncated at 120.
            assert n == min(len(captions[i][name].encode()) + 1, 120) == tokens[name]
            stored = out[f"t5_{name}"][i]
            assert stored.dtype == np.float16 and stored.shape == (n, TINY_T5_WIDTH)
            np.testing.assert_allclose(stored, features[0, :n].numpy(), rtol=2e-3, atol=2e-3)


def caption_config(**fields):
    return CaptionConfig(backend="tests.fixtures_data:SyntheticCaptioner", num_gpus=0, **fields)


def test_caption_stage_with_a_module_factory_backend():
    images = [picture(48, 64, s) for s in range(4)]
    rows = [sample_row(f"k{i}", "u", meta(f"k{i}", [48, 64], captions={"prompt": f"p{i}"}, source_id=f"id{i}"),
                       image=images[i]) for i in range(4)]
    rows.append(sample_row("dead", "u", meta("dead"), reject_stage="decode", reject_reason="x"))
    stage = CaptionStage(caption_config(name="llava", inject_source_caption=True,
                                        options={"fail_ids": ["id1"], "raise_ids": ["id2"]}))
    out = stage(batch_of(rows))
    assert list(out["reject_stage"]) == ["", "caption", "caption", "", "decode"]
    assert "refused" in out["reject_reason"][1] and "RuntimeError" in out["reject_reason"][2]
    metas = [json.loads(m) for m in out["meta"]]
    mean = [int(v) for v in images[0].reshape(-1, 3).mean(axis=0)]
    assert metas[0]["captions"] == {"prompt": "p0", "llava": f"a 64x48 picture, mean colour {mean[0]} {mean[1]} "
                                                             f"{mean[2]}; source says: p0"}
    assert metas[0]["caption_provenance"]["llava"]["backend"] == "tests.fixtures_data:SyntheticCaptioner"
    plain = CaptionStage(caption_config(name="synthetic"))(batch_of(rows[:1]))
    assert "source says" not in json.loads(plain["meta"][0])["captions"]["synthetic"]
    chosen = CaptionStage(caption_config(name="x", inject_source_caption=True), source_caption="missing")
    assert "source says" not in json.loads(chosen(batch_of(rows[:1]))["meta"][0])["captions"]["x"]


def test_missing_models_name_the_setting(tmp_path):
    with pytest.raises(MissingModelError, match="vae.model"):
        VaeStage(str(tmp_path / "no-vae"), device="cpu")
    with pytest.raises(MissingModelError, match="t5.model"):
        T5Stage(str(tmp_path / "no-t5"), ["x"], device="cpu")
    from common.config import ConfigError

    with pytest.raises(ConfigError, match="caption.backend"):
        validate_config({"source": {"kind": "folder", "root": "."}, "output": "o",
                         "caption": {"backend": "no-such-backend"}}, CurateConfig)
