"""jobs.gp_fewshot end to end on tiny untrained models, and the image-level classifier."""

import json

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from transformers import (
    AutoModel,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTokenizer,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from jobs.gp_fewshot import GPFewShotConfig, class_prompts, standard_error, train
from jobs.runner import cli
from kiln.diffusion.base import (
    COLOUR_FREE,
    ClipArch,
    DetectorArch,
    VaeArch,
    build_clip,
    build_detector,
    build_tokenizer,
    build_vae,
)
from kiln.gp import FeatureExtractor, FewShotClassifier
from kiln.pixels import from_pixels, remap_colours, to_pixels
from kiln.worlds.shapes import ATTRIBUTES, BACKGROUNDS, COLOURS, ShapesWorld, parse_caption

METHODS = {"zero_shot", "linear_probe", "tip_adapter", "knn", "gp_zero_mean", "gp_ensemble"}
METHODS |= {"gp_only_clip", "gp_only_vae", "gp_only_detector", "gp_only_invariant_detector"}
METHODS |= {"gp_ensemble_untempered"}


@pytest.fixture(autouse=True)
def one_thread():
    """Matrices of at most 24 x 24: threads only contend on a busy 2-core host."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A pretrain_diffusion-shaped run directory of tiny untrained models."""
    root = tmp_path_factory.mktemp("gp_base")
    torch.manual_seed(0)
    captions = [p for prompts in class_prompts().values() for p in prompts]
    tokenizer = build_tokenizer(captions, 16)
    arch = ClipArch(hidden_size=16, num_layers=1, num_heads=2, projection_dim=16)
    for clip in ("clip", "invariant_clip"):  # two CLIPs, as the base has
        build_clip(arch, tokenizer, 32).save_pretrained(root / clip / "model")
        tokenizer.save_pretrained(root / clip / "model")
    build_vae(VaeArch(channels=[8, 8]), 32).save_pretrained(root / "vae" / "model")
    build_detector(DetectorArch(channels=[8])).save_pretrained(root / "detector" / "model")
    invariant = build_detector(DetectorArch(channels=[8]), COLOUR_FREE)
    invariant.save_pretrained(root / "invariant_detector" / "model")
    return root


OVERRIDES = ["shots=[1,2]", "seeds=1", "pool_size=90", "test_size=12", "gp_iterations=5"]
OVERRIDES += ["prompts=captions"]  # not the default: the job must pass `prompts` on


def test_job_writes_the_table_plots_and_a_classifier_that_reloads(base_run, tmp_path):
    argv = ["--preset", "tiny", "--output", str(tmp_path), f"--set=base_run={base_run}"]
    summary, _ = cli("gp_fewshot", GPFewShotConfig, train, argv + [f"--set={o}" for o in OVERRIDES])
    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert rows == summary["rows"]
    keys = {(r["method"], r["shots"], r["split"]) for r in rows}
    assert keys == {(m, k, s) for m in METHODS for k in (1, 2) for s in ("test", "shifted")}
    for row in rows:
        assert set(row) == {"method", "shots", "split", "accuracy", "ece", "nll"}
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["ece"] <= 1 and row["nll"] > 0
    # The mean drop per method: the mean of the per-shot drops of the table, and an error.
    drops = summary["mean_drop"]
    for method, drop in drops.items():
        table = {(r["shots"], r["split"]): r["accuracy"] for r in rows if r["method"] == method}
        by_shots = [table[k, "test"] - table[k, "shifted"] for k in (1, 2)]
        assert drop["mean"] == pytest.approx(np.mean(by_shots))
        assert drop["stderr"] >= 0
    assert set(drops) == METHODS
    for drop in drops.values():
        gap = drop["mean"] - drops["gp_ensemble"]["mean"]
        assert drop["minus_gp_ensemble"] == pytest.approx(gap, abs=1e-12)
    assert drops["gp_ensemble"]["minus_gp_ensemble_stderr"] == 0
    for name in ("results.md", "accuracy_vs_shots.png", "reliability.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| gp_ensemble |" in (tmp_path / "results.md").read_text()
    classifier = FewShotClassifier.load(tmp_path / "classifier")  # fitted at 2 shots, seed 0
    assert classifier.extractor.class_names == summary["classes"]
    # The prior is the colour-invariant CLIP, the `clip` model of the default `models`.
    assert classifier.extractor.clip_dir == (base_run / "invariant_clip" / "model").resolve()
    assert classifier.extractor.class_prompts == class_prompts("captions")
    assert classifier.extractor.prior_views == GPFewShotConfig().prior_views > 0
    assert len(classifier.gp.train_targets[0]) == 2 * len(summary["classes"])


def test_classifier_save_load_round_trip_and_bad_images(base_run, tmp_path):
    world = ShapesWorld()
    scenes = world.scenes("validation", 30)
    names = list(class_prompts())
    labels = torch.tensor([names.index(s.attributes["shape"]) for s in scenes])
    images = world.images(scenes)
    models = {name: base_run / name / "model" for name in ("clip", "vae", "detector")}
    extractor = FeatureExtractor(base_run / "clip" / "model", models, class_prompts(), 2)
    missing = labels != names.index("face")
    with pytest.raises(ValueError, match=r"classes \['face'\] have zero shots"):
        FewShotClassifier.fit(extractor, images[missing.numpy()], labels[missing], iterations=2)
    fitted = FewShotClassifier.fit(extractor, images, labels, iterations=2)
    fitted.save(tmp_path)
    loaded = FewShotClassifier.load(tmp_path)
    assert loaded.extractor.prior_views == 2
    before, after = fitted.predict(images), loaded.predict(images)
    assert torch.equal(before.probabilities, after.probabilities)
    assert torch.equal(before.variance, after.variance)
    small = np.zeros((2, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match=r"images: expected uint8 \[N, 32, 32, 3\]"):
        fitted.predict(small)
    with pytest.raises(ValueError, match=r"images: expected uint8 \[N, 32, 32, 3\]"):
        fitted.predict(images.astype(np.float32))


def test_standard_error_of_a_mean_over_images():
    drops = torch.tensor([1.0, 0.0, 0.0, -1.0, 0.5, 0.0, 1.0, 0.0], dtype=torch.float64)
    assert standard_error(drops) == pytest.approx(scipy.stats.sem(drops.numpy()))
    # Negative control: the population std (ddof=0) is a different, smaller figure.
    assert standard_error(drops) > scipy.stats.sem(drops.numpy(), ddof=0)


def test_the_prior_averages_zero_shot_scores_over_fixed_recoloured_views(base_run):
    images = ShapesWorld().images(ShapesWorld().scenes("validation", 6))
    clip = base_run / "invariant_clip" / "model"
    plain = FeatureExtractor(clip, {}, class_prompts())
    viewed = FeatureExtractor(clip, {}, class_prompts(), prior_views=3)
    _, scores = viewed(images)
    # By hand: the plain scores of the image and of its recolourings by maps 0, 1 and 2, averaged.
    views = [images] + [
        from_pixels(remap_colours(to_pixels(images), torch.Generator().manual_seed(v), True))
        for v in range(3)
    ]
    torch.testing.assert_close(scores, torch.stack([plain(view)[1] for view in views]).mean(0))
    assert not torch.allclose(scores, plain(images)[1], atol=1e-4)  # the views count
    # One map per view for every image: an image's prior does not depend on its batch (a map
    # drawn per image would give image 2 another map alone than third in a batch).
    torch.testing.assert_close(viewed(images[2:3])[1], scores[2:3])
    with pytest.raises(ValueError, match="prior_views=-1: expected 0 or more"):
        FeatureExtractor(clip, {}, class_prompts(), prior_views=-1)


def test_folders_with_an_image_processor_get_their_own_preprocessing(base_run, tmp_path):
    """Real checkpoints ship a processor (resize, crop, mean/std): the extractor must use it."""
    torch.manual_seed(0)
    clip_dir, vit_dir = tmp_path / "clip", tmp_path / "vit"
    clip = CLIPModel.from_pretrained(base_run / "clip" / "model")
    clip.save_pretrained(clip_dir)
    CLIPTokenizer.from_pretrained(base_run / "clip" / "model").save_pretrained(clip_dir)
    clip_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    clip_processor.save_pretrained(clip_dir)
    vit = ViTModel(ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=32)).eval()  # fmt: skip
    vit.save_pretrained(vit_dir)
    vit_processor = ViTImageProcessor(
        size={"height": 16, "width": 16}, image_mean=[0.2, 0.3, 0.4], image_std=[0.1, 0.2, 0.3]
    )
    vit_processor.save_pretrained(vit_dir)
    plain = base_run / "detector" / "model"  # no processor: kiln's [-1, 1] convention
    models = {"clip": clip_dir, "vit": vit_dir, "detector": plain}
    extractor = FeatureExtractor(clip_dir, models, class_prompts())
    world = ShapesWorld()
    scenes = world.scenes("validation", 30)
    images = world.images(scenes)  # 32 x 32: the ViT only reads 16 x 16, via its processor
    features, zero_shot = extractor(images)

    with torch.no_grad():
        vit_pixels = vit_processor(list(images), return_tensors="pt").pixel_values
        expected_vit = vit(pixel_values=vit_pixels).pooler_output
        clip_pixels = clip_processor(list(images), return_tensors="pt").pixel_values
        expected_clip = clip.get_image_features(pixel_values=clip_pixels).pooler_output
        kiln_pixels = to_pixels(images)
        expected_detector = AutoModel.from_pretrained(plain)(pixel_values=kiln_pixels)
        unprocessed_clip = clip.get_image_features(pixel_values=kiln_pixels).pooler_output
    torch.testing.assert_close(features["vit"], expected_vit)
    torch.testing.assert_close(features["clip"], expected_clip)
    torch.testing.assert_close(features["detector"], expected_detector.pooler_output.flatten(1))
    expected_scores = F.normalize(expected_clip, dim=-1) @ extractor.class_embeddings.T
    torch.testing.assert_close(zero_shot, expected_scores)
    # Negative control: kiln's convention would give the CLIP other embeddings and scores.
    assert not torch.allclose(features["clip"], unprocessed_clip, atol=1e-3)
    unprocessed_scores = F.normalize(unprocessed_clip, dim=-1) @ extractor.class_embeddings.T
    assert not torch.allclose(zero_shot, unprocessed_scores, atol=1e-3)

    names = list(class_prompts())
    labels = torch.tensor([names.index(s.attributes["shape"]) for s in scenes])
    FewShotClassifier.fit(extractor, images, labels, iterations=2).save(tmp_path / "classifier")
    reloaded = FewShotClassifier.load(tmp_path / "classifier")
    torch.testing.assert_close(reloaded.extractor(images)[0]["vit"], expected_vit)


def test_class_prompts_name_the_shape_with_or_without_colours():
    colour_words = {*COLOURS, *BACKGROUNDS, "background"}
    free, captions = class_prompts("colour_free"), class_prompts("captions")
    assert list(free) == list(captions) == list(ATTRIBUTES["shape"])
    for shape in free:
        assert free[shape] and all(shape in prompt for prompt in free[shape])
        assert not any(colour_words & set(prompt.split()) for prompt in free[shape])
        assert len(captions[shape]) == len(COLOURS) * len(BACKGROUNDS)
        assert {parse_caption(prompt)["shape"] for prompt in captions[shape]} == {shape}
    assert free["star"] == ["one star", "two stars", "three stars", "a star in a box",
                            "a star in a cup"]  # fmt: skip
    with pytest.raises(ValueError, match=r"prompts='colourfree': expected one of"):
        class_prompts("colourfree")


def test_bad_config_is_refused_before_any_work(base_run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli("gp_fewshot", GPFewShotConfig, train, ["--set=shots=[0,4]", "--output", str(tmp_path)])
    assert "expected positive shot counts" in capsys.readouterr().err
    missing = ["--set=models={clip: clip/model, dino: dino/model}", f"--set=base_run={base_run}"]
    with pytest.raises(SystemExit):
        cli("gp_fewshot", GPFewShotConfig, train, [*missing, "--output", str(tmp_path / "m")])
    assert "models.dino: expected a saved model folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli("gp_fewshot", GPFewShotConfig, train, ["--set=probe_models=[dino]"])
    assert "probe_models=['dino']: expected names from" in capsys.readouterr().err
