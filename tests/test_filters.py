import imagehash
import numpy as np
import pytest
import torch
from PIL import Image

from curation.dedup import Candidate, HammingIndex, find_duplicates, phash_int
from curation.filters import screen, size_rejection
from curation.images import ImageError, ImageInfo, decode, probe
from curation.sources.base import RawSample, Rejection
from tests.fixtures_data import (cmyk_jpeg, decompression_bomb_png, exif_rotated_jpeg, gradient, gray16_png,
                                 grayscale_jpeg, not_an_image, photo, png_with_alpha, recompressed,
                                 rgb16_png, truncated_jpeg)


# ---- decoding bad and unusual files -------------------------------------------------------------------------------
@pytest.mark.parametrize("make, reason", [
    (lambda p: truncated_jpeg(photo(p, "dog.jpg")), "truncated"),
    (lambda p: b"", "empty file"),
    (lambda p: not_an_image(), "not an image"),
    (lambda p: decompression_bomb_png(), "decompression bomb"),
])
def test_unusable_images_are_errors_with_reasons(photos_dir, make, reason):
    with pytest.raises(ImageError, match=reason):
        decode(make(photos_dir))


def test_bomb_guard_is_pils_own_limit_and_max_pixels_tightens_it(photos_dir):
    assert Image.MAX_IMAGE_PIXELS is not None  # the guard is on
    with pytest.raises(ImageError, match="decompression bomb"):
        probe(decompression_bomb_png())  # rejected from the header alone, nothing is decoded
    with pytest.raises(ImageError, match="max_pixels"):
        decode(photo(photos_dir, "dog.jpg"), max_pixels=800 * 534 - 1)
    assert decode(photo(photos_dir, "dog.jpg"), max_pixels=800 * 534)[0].size == (800, 534)


def test_alpha_is_composited_over_white():
    image, info = decode(png_with_alpha(200, 300))
    pixels = np.asarray(image)
    assert info.mode == "RGBA" and image.mode == "RGB"
    assert (pixels[:, :150] == (255, 0, 0)).all() and (pixels[:, 150:] == 255).all()


def test_cmyk_becomes_rgb():
    image, info = decode(cmyk_jpeg(200, 300))
    reference = np.asarray(gradient(200, 300, seed=11), np.float64)  # what was converted to CMYK and saved
    assert info.mode == "CMYK" and image.mode == "RGB"
    assert np.abs(np.asarray(image, np.float64) - reference).mean() < 8


def test_16_bit_images_scale_to_8_bits():
    grey, info = decode(gray16_png(10, 256))
    assert info.mode.startswith("I")
    expected = np.round(np.linspace(0, 65535, 256).astype(np.uint16) / 65535 * 255)
    assert np.abs(np.asarray(grey)[0, :, 0] - expected).max() <= 1
    rgb, _ = decode(rgb16_png(8, 64))
    row = np.asarray(rgb)[0].astype(int)
    assert row[0, 0] >= 254 and row[0, 2] <= 1 and row[-1, 0] <= 1 and row[-1, 2] >= 254  # red -> blue


def test_greyscale_becomes_three_equal_channels(photos_dir):
    image, info = decode(grayscale_jpeg(photo(photos_dir, "groceries.jpg")))
    pixels = np.asarray(image)
    assert info.mode == "L" and (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_exif_orientation_is_applied(photos_dir):
    original, _ = decode(photo(photos_dir, "dog.jpg"))
    rotated, info = decode(exif_rotated_jpeg(photo(photos_dir, "dog.jpg")))
    assert info.orientation == 6 and info.size_hw == (534, 800) and rotated.size == original.size
    assert np.abs(np.asarray(rotated, np.float64) - np.asarray(original, np.float64)).mean() < 4
    assert probe(exif_rotated_jpeg(photo(photos_dir, "dog.jpg"))).size_hw == (534, 800)


# ---- size filters and the screen ----------------------------------------------------------------------------------
def test_size_rejections():
    info = lambda h, w: ImageInfo(height=h, width=w, format="JPEG", mode="RGB")  # noqa: E731
    assert size_rejection(info(256, 1024), 256, 4.0) is None
    assert size_rejection(info(255, 1000), 256, 4.0).stage == "min_side"
    assert size_rejection(info(256, 1025), 256, 4.0).stage == "aspect_ratio"
    assert size_rejection(info(1025, 256), 256, 4.0).stage == "aspect_ratio"
    assert size_rejection(info(1025, 256), 256, None) is None


def test_screen_records_source_problems_decode_failures_sizes_and_hashes(photos_dir):
    def sample(data, reject=None):
        return RawSample(key="k", source="s", source_id="i", unit="u", data=data, reject=reject)

    assert screen(sample(None, Rejection("source", "bad json")), 64, 4.0, None, 8).rejection.stage == "source"
    assert screen(sample(b"junk"), 64, 4.0, None, 8).rejection.stage == "decode"
    assert screen(sample(truncated_jpeg(photo(photos_dir, "truck.jpg"))), 64, 4.0, None, 8).rejection.stage == "decode"
    assert screen(sample(photo(photos_dir, "dog.jpg")), 600, 4.0, None, 8).rejection.stage == "min_side"
    ok = screen(sample(photo(photos_dir, "dog.jpg")), 256, 4.0, None, 8)
    assert ok.rejection is None and ok.info.size_hw == (534, 800) and 0 <= ok.phash < 2**64
    assert screen(sample(photo(photos_dir, "dog.jpg")), 256, 4.0, None, None).phash is None


# ---- perceptual hashing and duplicate search ----------------------------------------------------------------------
def test_phash_int_is_imagehash_phash(photos_dir):
    image = Image.open(photos_dir / "groceries.jpg")
    assert phash_int(image) == int(str(imagehash.phash(image)), 16)
    assert phash_int(image, hash_size=4) == int(str(imagehash.phash(image, hash_size=4)), 16)


def test_near_duplicates_are_close_and_distinct_photos_are_far(photos_dir):
    small = lambda data: decode(data, min_size_hw=(64, 64))[0]  # noqa: E731 - the screen's draft decode
    dog = phash_int(small(photo(photos_dir, "dog.jpg")))
    assert (dog ^ phash_int(small(recompressed(photo(photos_dir, "dog.jpg"))))).bit_count() <= 4
    for name in ("dogs.jpg", "truck.jpg", "groceries.jpg"):
        assert (dog ^ phash_int(small(photo(photos_dir, name)))).bit_count() > 12


@pytest.mark.parametrize("radius", [0, 1, 3, 6, 10])
def test_hamming_index_equals_brute_force(radius):
    rng = np.random.default_rng(radius)
    codes = [int(c) for c in rng.integers(0, 2**63, size=300, dtype=np.int64) * 2 + rng.integers(0, 2, 300)]
    for i in range(0, 300, 3):  # plant neighbours at every distance up to radius + 2
        flips = rng.choice(64, size=int(rng.integers(0, radius + 3)), replace=False)
        codes.append(codes[i] ^ sum(1 << int(b) for b in flips))
    index = HammingIndex(64, radius)
    for item, code in enumerate(codes):
        index.add(code, item)
    for query in codes[::7] + [int(rng.integers(0, 2**63))]:
        brute = {(item, (query ^ code).bit_count()) for item, code in enumerate(codes)
                 if (query ^ code).bit_count() <= radius}
        assert set(index.query(query)) == brute


def test_duplicates_keep_the_first_occurrence_and_the_smallest_key():
    def c(key, unit_rank, ordinal, phash, source_id=None):
        return Candidate(unit=f"u{unit_rank}", unit_rank=unit_rank, ordinal=ordinal, key=key,
                         source_id=source_id or key, phash=phash)

    samples = [
        c("b", 0, 0, 0b0000),
        c("a", 1, 0, 0b0011),       # 2 bits from b: near-duplicate of b, but "a" sorts first, so b goes
        c("b", 0, 5, 0b1111_0000),  # key b again, later in unit 0: duplicate id
        c("c", 0, 1, 0b1111_0001),  # far from a (6 bits): kept
        c("d", 0, 2, 0b1111_0101),  # 1 bit from c: near-duplicate of c
        c("e", 0, 3, 0b1111_0111),  # 2 bits from c, 1 from d: d is gone, c is kept -> near-duplicate of c
        c("f", 0, 4, None),         # no hash: only the id check applies
    ]
    rejected = find_duplicates(samples, max_distance=2)
    assert {i: r.stage for i, r in rejected.items()} == {
        0: "near_duplicate", 2: "duplicate_id", 4: "near_duplicate", 5: "near_duplicate"}
    assert "within 2 bits of a" in rejected[0].reason and "of c" in rejected[4].reason and "of c" in rejected[5].reason
    assert "unit u0" in rejected[2].reason
    assert {i: r.stage for i, r in find_duplicates(samples, max_distance=None).items()} == {2: "duplicate_id"}
    # Visiting order is a function of the data, not of the input order.
    order = [6, 3, 0, 5, 2, 1, 4]
    shuffled = find_duplicates([samples[i] for i in order], max_distance=2)
    assert {order[i]: r.stage for i, r in shuffled.items()} == {i: r.stage for i, r in rejected.items()}


def test_near_duplicate_groups_keep_the_best_sample():
    """Most pixels, then a still picture over an animated one, then the key; whatever the input order."""
    def c(key, phash, pixels, animated=False):
        return Candidate(unit="u0", unit_rank=0, ordinal=ord(key[0]), key=key, source_id=key, phash=phash,
                         pixels=pixels, animated=animated)

    samples = [c("a_gif", 0b0000, 600 * 400, animated=True),  # the small animated copy sorts first by key
               c("z_jpg", 0b0001, 1500 * 1000),                # the original: most pixels
               c("m_png", 0b0011, 600 * 400),                  # same size as the GIF, but still
               c("b_gif", 0b0111, 600 * 400, animated=True)]
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        shuffled = [samples[i] for i in order]
        rejected = find_duplicates(shuffled, max_distance=4)
        kept = {s.key for i, s in enumerate(shuffled) if i not in rejected}
        assert kept == {"z_jpg"}
        assert all("of z_jpg" in r.reason for r in rejected.values())
    # Without the original, the still picture wins over the animated ones of the same size.
    rejected = find_duplicates([samples[0], samples[2], samples[3]], max_distance=4)
    assert set(rejected) == {0, 2}


def test_screen_marks_animated_pictures(tmp_path):
    import io

    from PIL import Image

    from curation.filters import screen
    from curation.sources.base import RawSample
    from tests.fixtures_data import gradient

    frames = [gradient(80, 120, seed=i).convert("P") for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    still = io.BytesIO()
    frames[0].save(still, "GIF")
    animated = screen(RawSample("k", "s", "k", "u", data=buf.getvalue()), 64, 4.0, None, 8)
    assert animated.rejection is None and animated.animated
    assert not screen(RawSample("k", "s", "k", "u", data=still.getvalue()), 64, 4.0, None, 8).animated
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 3


# ---- aesthetic predictor --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=24)
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _random_mlp_state(dim: int) -> dict:
    torch.manual_seed(1)
    shapes = {0: (1024, dim), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}
    state = {}
    for index, (out, inp) in shapes.items():
        state[f"layers.{index}.weight"] = torch.randn(out, inp) / inp ** 0.5
        state[f"layers.{index}.bias"] = torch.randn(out) * 0.1
    return state


def test_aesthetic_score_matches_a_reference_computation(tiny_clip_dir, tmp_path, photos_dir):
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from curation.aesthetic import AestheticConfig, AestheticScorer, AestheticStage
    from curation.writer import sample_row

    state = _random_mlp_state(24)
    save_file(state, str(tmp_path / "head.safetensors"))
    torch.save(state, tmp_path / "head.pth")
    images = [Image.open(photos_dir / n).convert("RGB") for n in ("dog.jpg", "truck.jpg")]
    # Reference: transformers directly, then the MLP as plain matrix products (no activations, as released).
    model = CLIPVisionModelWithProjection.from_pretrained(tiny_clip_dir).eval()
    pixels = CLIPImageProcessor.from_pretrained(tiny_clip_dir)(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        x = model(pixel_values=pixels).image_embeds.double().numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    for index in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{index}.weight"].double().numpy().T + state[f"layers.{index}.bias"].double().numpy()
    expected = x[:, 0]
    for head in ("head.safetensors", "head.pth"):
        scores = AestheticScorer(str(tiny_clip_dir), tmp_path / head, device="cpu").score(images)
        np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)

    threshold = float(np.mean(expected))  # one photo above, one below
    stage = AestheticStage(AestheticConfig(clip_model=str(tiny_clip_dir), predictor=str(tmp_path / "head.pth"),
                                           min_score=threshold), device="cpu")
    rows = [sample_row(f"k{i}", "u", {"key": f"k{i}"}, image=np.asarray(im.resize((64, 48))))
            for i, im in enumerate(images)]
    rows.append(sample_row("k2", "u", {"key": "k2"}, reject_stage="decode", reject_reason="broken"))
    batch = {name: [row[name] for row in rows] for name in rows[0]}
    out = stage(batch)
    stages = list(out["reject_stage"])
    assert stages[2] == "decode" and sorted(stages[:2]) == ["", "aesthetic"]
    import json
    assert all("aesthetic" in json.loads(m)["scores"] for m in out["meta"][:2])


def test_aesthetic_weights_are_never_unpickled(tmp_path):
    import pickle

    from curation.aesthetic import load_predictor

    class Exploit:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    with open(tmp_path / "evil.pth", "wb") as handle:
        pickle.dump({"layers.0.weight": Exploit()}, handle, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_predictor(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()
    torch.save({"something": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an aesthetic predictor"):
        load_predictor(tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError, match="filters.aesthetic.predictor"):
        load_predictor(tmp_path / "missing.safetensors")
