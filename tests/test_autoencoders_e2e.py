"""Each kind of autoencoder end to end, as a user runs it: a curate job through Ray encodes a folder of pictures with
it, the trainer trains a few steps on the shards and writes its weights folder, `training.sample` samples from
that, and `training.export` builds a PixArtAlphaPipeline where diffusers' pipeline can decode the latents (an
unshifted AutoencoderKL) and refuses in one line where it cannot."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from common.autoencoder import LatentSpace
from curation.shard_format import iter_shard
from tests.fixtures_data import gradient, jpeg_bytes

# kind -> (vae_class, the latent space its config defines)
KINDS = {
    "kl": ("AutoencoderKL", LatentSpace(4, 8, 0.18215, 0.0)),
    "kl-shift": ("AutoencoderKL", LatentSpace(16, 8, 1.5305, 0.0609)),
    "dc": ("AutoencoderDC", LatentSpace(32, 32, 0.41407, 0.0)),
}
RESOLUTION = 128  # buckets of 128 px, sides multiples of 64: whole 2x2 patches of DC-AE's 32x latents
PICTURES = 6


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pictures")
    for i in range(PICTURES):
        (folder / f"p{i}.jpg").write_bytes(jpeg_bytes(gradient(160, 160, seed=10 + i)))
        (folder / f"p{i}.txt").write_text(f"pattern {i}")
    return folder


def curate(pictures: Path, out: Path, vae_dir: Path, vae_class: str, t5_dir: Path) -> dict:
    from common.config import load_config
    from pipelines.curate import CurateConfig, run

    config = {
        "source": {"kind": "folder", "root": str(pictures)},
        "output": str(out),
        "buckets": {"resolution": RESOLUTION, "multiple": 64},
        "filters": {"min_side": 64},
        "vae": {"model": str(vae_dir), "model_class": vae_class},
        "t5": {"model": str(t5_dir), "captions": ["original"]},
        "ray": {"read_num_cpus": 0.5, "write_num_cpus": 0.5, "progress": False,
                "vae": {"num_cpus": 0.25, "batch_size": 4}, "t5": {"num_cpus": 0.25, "batch_size": 8}},
    }
    (out.parent / "curate.yaml").write_text(yaml.safe_dump(config))
    return run(load_config(out.parent / "curate.yaml", CurateConfig))


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_curate_train_sample_export(kind, ray_cluster, pictures, tiny_autoencoder_dirs, tiny_t5_dir, tmp_path,
                                    capsys):
    from training.export import main as export_main
    from training.sample import main as sample_main
    from training.sample import read_pipeline_info
    from training.train_config import load_train_config
    from training.trainer import train

    vae_class, space = KINDS[kind]
    vae_dir = tiny_autoencoder_dirs[kind]

    # Curation: the card records the autoencoder's latent space; the shards hold its mean and std (0 for DC-AE).
    data = tmp_path / "data"
    card = curate(pictures, data, vae_dir, vae_class, tiny_t5_dir)
    assert card["counts"]["seen"] == PICTURES == card["counts"]["accepted"] + card["counts"]["rejected"]
    assert card["counts"]["accepted"] >= 4, card["counts"]
    assert card["vae"] == {"model": str(vae_dir), "model_class": vae_class, "subfolder": None, **space.to_card()}
    side = RESOLUTION // space.downsample_factor
    manifest = pq.read_table(data / "manifest.parquet").to_pylist()
    samples = [s for shard in sorted({row["shard"] for row in manifest}) for s in iter_shard(data / shard)]
    assert len(samples) == card["counts"]["accepted"]
    for sample in samples:
        assert sample.latent_mean.shape == sample.latent_std.shape == (space.channels, side, side)
        assert (sample.latent_std == 0).all() == (kind == "dc")

    # Training: in_channels follow the latent channels; pipeline.json records the latent space trained in.
    run_dir = tmp_path / "run"
    config = {
        "stage": 2, "name": kind,
        "model": {"preset": "tiny", "overrides": {"in_channels": space.channels, "input_size": side}},
        "data": {"root": str(data), "caption": "original", "batch_size": 2, "num_workers": 0},
        "optimizer": {"warmup_steps": 1},
        "pretrained": {"vae": str(vae_dir), "vae_class": vae_class, "text_encoder": str(tiny_t5_dir)},
        "sampling": {"every": 3, "prompts": ["pattern 1"], "steps": 2},
        "run": {"output_dir": str(run_dir), "steps": 3, "checkpoint_every": 3, "progress": False, "cpu_threads": 1},
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    result = train(load_train_config(tmp_path / "train.yaml"))
    assert len(result.losses) == 3 and np.isfinite(result.losses).all()
    grid = Image.open(run_dir / "samples" / "step_00000003.png")  # the trainer's grid decoded through the AE
    assert grid.width >= RESOLUTION
    info = read_pipeline_info(run_dir / "final")
    assert (info.vae, info.vae_class) == (str(vae_dir), vae_class)
    assert (info.latent_channels, info.scaling_factor, info.vae_shift_factor) == (
        space.channels, space.scaling_factor, space.shift_factor)

    # Sampling from the weights folder alone.
    sample_main(["--checkpoint", str(run_dir / "final"), "--prompt", "pattern 2", "--out", str(tmp_path / "s"),
                 "--steps", "2", "--batch-size", "1"])
    record = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert (record["scaling_factor"], record["shift_factor"]) == (space.scaling_factor, space.shift_factor)
    image = Image.open(tmp_path / "s" / record["images"][0]["file"])
    assert image.size == (RESOLUTION, RESOLUTION)

    # Export: PixArtAlphaPipeline decodes vae.decode(latents / scaling_factor) with an AutoencoderKL.
    out = tmp_path / "pipe"
    if kind == "kl":
        from diffusers import PixArtAlphaPipeline

        pipe = PixArtAlphaPipeline.from_pretrained(export_main(["--checkpoint", str(run_dir / "final"),
                                                                "--out", str(out)]))
        assert pipe.vae.config.scaling_factor == space.scaling_factor
        assert pipe.transformer.config.in_channels == space.channels
    else:
        capsys.readouterr()
        with pytest.raises(SystemExit) as refused:  # the CLI's one-line error, exit status 2
            export_main(["--checkpoint", str(run_dir / "final"), "--out", str(out)])
        assert refused.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        message = lines[-1].partition("error: ")[2]
        assert message.startswith("--vae: PixArtAlphaPipeline")
        assert ("shift_factor 0.0609" if kind == "kl-shift" else "AutoencoderDC") in message
        assert not out.exists()
