"""`python -m jobs.pretrain_diffusion` end to end, shortened, and `python -m jobs.generate`.

The CLIP, VAE and both detector stages are trained with their own hooks in a plain loop and left in
the run directory as finished stages (what the runner leaves); the command line then skips them,
trains the UNet through Ray Train (2 workers, ZeRO-2), assembles the pipeline and evaluates it.
A Ray Train run costs 30-70 s of fixed start-up on a 2-core machine, so one stage goes through
Ray here; every stage is the same runner code path.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPModel, CLIPTokenizer

from jobs import generate
from jobs.pretrain_diffusion import (
    JOBS,
    RECOLOURED_FRACTION,
    PretrainDiffusionConfig,
    _stage_config,
    train,
)
from jobs.runner import check_config, cli, collate
from kiln.config import ConfigError, load_config
from kiln.diffusion.base import (
    COLOUR_FREE,
    clip_loss,
    detector_loss,
    recoloured_positives,
)
from kiln.diffusion.evaluate import generate_images
from kiln.pixels import from_pixels, remap_colours, to_pixels
from kiln.worlds.shapes import ATTRIBUTES, ShapesWorld, colour_free_caption

OVERRIDES = [
    "world.train_size=256", "world.eval_size=48", "schedules.unet.steps=3",
    "schedules.unet.batch_size=8", "runner.log_every=1", "runner.checkpoint_every=0",
    "evaluation.prompts=4", "evaluation.images_per_prompt=2", "evaluation.steps=2",
]  # fmt: skip


def _finish_stage_without_ray(config: PretrainDiffusionConfig, run_dir, stage: str) -> None:
    job, stage_config = JOBS[stage], _stage_config(config, stage)
    stage_dir = run_dir / stage
    stage_dir.mkdir(parents=True)
    check_config(stage_config, stage_dir)
    job.prepare(stage_config, stage_dir)
    torch.manual_seed(0)
    model = job.build_model(stage_config, stage_dir)
    dataset = job.build_dataset(stage_config, stage_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(2):
        loss, _ = job.step(
            model, collate(dataset, range(step * 8, step * 8 + 8), "cpu"), stage_config
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    job.export(model, stage_config, stage_dir, stage_dir / "model")
    (stage_dir / "summary.json").write_text(json.dumps(job.evaluate(stage_config, stage_dir)))


@pytest.fixture(scope="module")
def base_run(ray_cluster, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("diffusion") / "run"
    config = load_config(PretrainDiffusionConfig, "tiny", None, OVERRIDES)
    for stage in ("clip", "vae", "detector", "invariant_detector", "invariant_clip"):
        _finish_stage_without_ray(config, run_dir, stage)
    argv = ["--preset", "tiny", "--output", str(run_dir)] + [f"--set={o}" for o in OVERRIDES]
    summary, _ = cli("pretrain_diffusion", PretrainDiffusionConfig, train, argv)
    return run_dir, summary, config


def test_stages_artifacts_and_evaluation(base_run):
    run_dir, summary, config = base_run
    assert summary["unet"]["steps"] == 3
    for guidance in ("guidance_1", "guidance_5"):
        scores = summary["evaluation"][guidance]
        assert 0 <= scores["concept_accuracy"] <= 1 and scores["frechet_distance"] > 0
        assert "clip_score" in scores and "concept_accuracy/shape" in scores
    assert set(summary["detector"]) >= {f"test_accuracy/{a}" for a in ("shape", "face_quality")}
    assert set(summary["invariant_detector"]) == {
        f"{view}test_accuracy/{a}" for view in ("", "recoloured_") for a in COLOUR_FREE
    }
    assert set(summary["invariant_clip"]) == {
        "zero_shot_caption_accuracy", "zero_shot_chance", "colour_free_accuracy",
        "recoloured_colour_free_accuracy", "colour_free_chance",
    }  # fmt: skip
    invariant_clip = CLIPModel.from_pretrained(run_dir / "invariant_clip" / "model")
    assert invariant_clip.config.vision_config.patch_size == config.invariant_clip_patch_size
    assert (run_dir / "samples.png").stat().st_size > 0
    # The UNet trained through Ray: every parameter moved from the runner's seeded init.
    torch.manual_seed(config.runner.seed)
    initial = JOBS["unet"].build_model(_stage_config(config, "unet"), run_dir / "unet")
    trained = UNet2DConditionModel.from_pretrained(run_dir / "unet" / "model")
    frozen = [
        name
        for name, p in trained.named_parameters()
        if torch.equal(p, dict(initial.named_parameters())[name])
    ]
    assert not frozen, frozen[:5]


def test_rerun_skips_the_finished_base(base_run):
    run_dir, summary, _ = base_run
    stamp = (run_dir / "unet" / "model").stat().st_mtime
    again, _ = cli("pretrain_diffusion", PretrainDiffusionConfig, train,
                   ["--output", str(run_dir)] + [f"--set={o}" for o in OVERRIDES])  # fmt: skip
    assert again == summary and (run_dir / "unet" / "model").stat().st_mtime == stamp


def test_stages_without_the_unet_train_no_pipeline(tmp_path):
    """What the GP ensemble needs (clip, vae, detector): those stages' runs, no UNet stage, no
    pipeline and no evaluation of one. The stages are finished without Ray, so `train` must
    only skip them: a UNet stage would train through Ray and leave unet/ and pipeline/."""
    run_dir = tmp_path / "run"
    overrides = [*OVERRIDES, "stages=[detector,clip,vae]"]
    config = load_config(PretrainDiffusionConfig, "tiny", None, overrides)
    assert config.stages == ["clip", "vae", "detector"]  # training order
    for stage in config.stages:
        _finish_stage_without_ray(config, run_dir, stage)
    summary = train(config, run_dir)
    assert set(summary) == {"clip", "vae", "detector"}
    assert not (run_dir / "unet").exists() and not (run_dir / "pipeline").exists()


@pytest.mark.parametrize("stages", ["[unet]", "[clip,unet]", "[]", "[clip,text]"])
def test_bad_stage_lists_are_refused(stages):
    with pytest.raises(ConfigError, match="stages"):
        load_config(PretrainDiffusionConfig, "tiny", None, [f"stages={stages}"])


def test_pipeline_folder_loads_in_plain_diffusers_without_kiln(base_run):
    run_dir, _, _ = base_run
    detector = str(run_dir / "detector" / "model")
    invariant = str(run_dir / "invariant_detector" / "model")
    script = (
        "import sys; sys.modules['kiln'] = None\n"  # any kiln import would now fail
        "from diffusers import StableDiffusionPipeline\n"
        "from transformers import AutoModelForImageClassification, CLIPModel\n"
        f"p = StableDiffusionPipeline.from_pretrained({str(run_dir / 'pipeline')!r})\n"
        "out = p('two red stars on a gray background', num_inference_steps=2, output_type='np')\n"
        "print(out.images.shape)\n"
        f"CLIPModel.from_pretrained({str(run_dir / 'clip' / 'model')!r})\n"
        f"d = AutoModelForImageClassification.from_pretrained({detector!r})\n"
        "print(d.config.id2label[0])\n"
        f"i = AutoModelForImageClassification.from_pretrained({invariant!r})\n"
        "print(sorted({label.split('=')[0] for label in i.config.id2label.values()}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(1, 32, 32, 3)" in result.stdout and "background=black" in result.stdout
    assert str(sorted(COLOUR_FREE)) in result.stdout  # no colour or background labels
    # The folder holds exactly what the UNet stage exported (a round trip, not a re-init).
    pipeline = StableDiffusionPipeline.from_pretrained(run_dir / "pipeline")
    exported = UNet2DConditionModel.from_pretrained(run_dir / "unet" / "model")
    for (name, a), (_, b) in zip(pipeline.unet.state_dict().items(), exported.state_dict().items()):
        assert torch.equal(a, b), name


def test_unet_trained_on_the_conditioning_the_pipeline_computes(base_run):
    run_dir, _, _ = base_run
    trained_on = torch.load(run_dir / "unet" / "assets" / "latents.pt")["embeds"][1:5]
    captions = json.loads((run_dir / "assets" / "captions.json").read_text())[:4]
    pipeline = StableDiffusionPipeline.from_pretrained(run_dir / "pipeline")
    at_inference, _ = pipeline.encode_prompt(captions, "cpu", 1, False)
    assert torch.allclose(at_inference, trained_on, atol=1e-5)
    # Negative control: without the mask flag, diffusers computes other states for the padding.
    pipeline.text_encoder.config.use_attention_mask = False
    unmasked, _ = pipeline.encode_prompt(captions, "cpu", 1, False)
    assert not torch.allclose(unmasked, trained_on, atol=1e-3)


def test_generate_adds_nothing_to_the_pipeline_call(base_run, tmp_path):
    run_dir, _, _ = base_run
    pipeline = StableDiffusionPipeline.from_pretrained(run_dir / "pipeline")
    prompts = ["one red star on a black background", "a blue face on a white background"]
    ours = generate_images(pipeline, prompts, 2, steps=3, guidance=5.0, seed=7, progress=False)
    plain = pipeline(prompt=prompts, num_images_per_prompt=2, num_inference_steps=3,
                     guidance_scale=5.0, generator=torch.Generator().manual_seed(7),
                     output_type="np").images  # fmt: skip
    assert np.array_equal(ours, (plain * 255).round().clip(0, 255).astype(np.uint8))
    other_seed = generate_images(
        pipeline, prompts, 2, steps=3, guidance=5.0, seed=8, progress=False
    )
    assert not np.array_equal(ours, other_seed)  # negative control: the seed is honoured

    out = generate.main(["--model", str(run_dir / "pipeline"), "--prompt", prompts[0],
                         "--prompt", prompts[1], "--steps", "2", "--images", "3",
                         "--out", str(tmp_path / "grid.png")])  # fmt: skip
    from PIL import Image

    assert Image.open(out).size == (3 * 128, 2 * 128)


def test_generate_rejects_a_folder_that_is_not_a_pipeline(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "jobs.generate", "--model", str(tmp_path), "--prompt", "x"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "model_index.json" in result.stderr


def test_from_pixels_inverts_to_pixels_for_every_8_bit_value():
    images = np.arange(256, dtype=np.uint8).repeat(3).reshape(1, 16, 16, 3)
    back = from_pixels(to_pixels(images))
    assert back.dtype == np.uint8 and np.array_equal(back, images)
    # Negative control: truncating instead of rounding loses values (float error lands below).
    truncated = ((to_pixels(images) + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert not np.array_equal(truncated, images)


def test_a_shared_colour_map_recolours_a_whole_batch_alike_and_a_generator_fixes_it():
    world = ShapesWorld()
    copies = to_pixels(world.images(world.scenes("validation", 1))).expand(4, -1, -1, -1)
    shared = remap_colours(copies, torch.Generator().manual_seed(0), shared=True)
    assert all(torch.equal(copy, shared[0]) for copy in shared)
    assert not torch.allclose(shared[0], copies[0], atol=0.1)  # it did recolour
    assert torch.equal(remap_colours(copies, torch.Generator().manual_seed(0), shared=True), shared)
    other = remap_colours(copies, torch.Generator().manual_seed(1), shared=True)
    assert not torch.equal(other, shared)
    # Without `shared`, each copy gets its own map (the training augmentation).
    own = remap_colours(copies, torch.Generator().manual_seed(0))
    assert not torch.equal(own[0], own[1])


def test_remap_colours_changes_the_palette_and_keeps_the_layout():
    world = ShapesWorld()
    pixels = to_pixels(world.images(world.scenes("validation", 16)))
    torch.manual_seed(0)
    remapped = remap_colours(pixels)
    assert remapped.shape == pixels.shape and remapped.abs().max() <= 1
    # The palette moved: a no-op (or a mild jitter) fails this.
    assert (remapped - pixels).abs().mean() > 0.2
    for before, after in zip(pixels, remapped):
        colours, region = before.flatten(1).T.unique(dim=0, return_inverse=True)
        # One map per image: pixels that shared a colour still share one ...
        for c in range(len(colours)):
            members = after.flatten(1).T[region == c]
            assert torch.allclose(members, members[0].expand_as(members))
    # ... and each image gets its own map: copies of one image come out in different colours.
    copies = remap_colours(pixels[:1].expand(16, -1, -1, -1))
    assert len({tuple(copy[:, 0, 0].tolist()) for copy in copies}) == 16


def test_the_invariant_detector_trains_on_recoloured_images_and_colour_free_labels():
    config = load_config(PretrainDiffusionConfig, "tiny", None, OVERRIDES)
    job = JOBS["invariant_detector"]
    stage_config = _stage_config(config, "invariant_detector")
    torch.manual_seed(0)
    model = job.build_model(stage_config, None)
    assert {label.split("=")[0] for label in model.config.id2label.values()} == set(COLOUR_FREE)
    world = ShapesWorld()
    scenes = world.scenes("validation", 8)
    labels = torch.tensor([[ATTRIBUTES[a].index(s.attributes[a]) for a in ATTRIBUTES]
                           for s in scenes])  # fmt: skip
    batch = {"pixel_values": to_pixels(world.images(scenes)), "labels": labels}
    torch.manual_seed(1)
    loss, _ = job.step(model, batch, stage_config)
    torch.manual_seed(1)
    recoloured = model(pixel_values=remap_colours(batch["pixel_values"])).logits
    assert torch.equal(loss, detector_loss(recoloured, labels, COLOUR_FREE))
    plain = model(pixel_values=batch["pixel_values"]).logits
    assert not torch.allclose(loss, detector_loss(plain, labels, COLOUR_FREE))  # it recolours


def test_the_invariant_clip_pairs_recoloured_images_with_colour_free_captions(tmp_path):
    config = load_config(PretrainDiffusionConfig, "tiny", None, OVERRIDES)
    job, stage_config = JOBS["invariant_clip"], _stage_config(config, "invariant_clip")
    stage_dir = tmp_path / "invariant_clip"
    job.prepare(stage_config, stage_dir)
    batch = collate(job.build_dataset(stage_config, stage_dir), range(16), "cpu")
    # The colour-free captions are the images' own, and their ids tell them apart.
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "assets" / "tokenizer")
    scenes = ShapesWorld(config.world).scenes("train")[:16]
    expected = [colour_free_caption(scene.attributes) for scene in scenes]
    decoded = tokenizer.batch_decode(batch["free_input_ids"], skip_special_tokens=True)
    assert [" ".join(text.split()) for text in decoded] == expected
    same = batch["free_caption_ids"][:, None] == batch["free_caption_ids"][None, :]
    assert torch.equal(same, torch.tensor([[a == b for b in expected] for a in expected]))
    torch.manual_seed(0)
    model = job.build_model(stage_config, stage_dir)
    torch.manual_seed(1)
    loss, _ = job.step(model, batch, stage_config)
    # The same draw by hand: the step's mask first, then remap_colours' draws.
    torch.manual_seed(1)
    recolour = torch.rand(16) < RECOLOURED_FRACTION
    assert 0 < recolour.sum() < 16
    pixels = torch.where(recolour[:, None, None, None], remap_colours(batch["pixel_values"]),
                         batch["pixel_values"])  # fmt: skip
    row = recolour[:, None]
    input_ids = torch.where(row, batch["free_input_ids"], batch["input_ids"])
    attention_mask = torch.where(row, batch["free_attention_mask"], batch["attention_mask"])
    positives = recoloured_positives(batch["caption_ids"], batch["free_caption_ids"], recolour)
    # L_clip written out: each direction's targets normalised over its own rows.
    logits = model(pixel_values=pixels, input_ids=input_ids, attention_mask=attention_mask)
    logits = logits.logits_per_image
    by_image = -(positives / positives.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1)
    by_text = -(positives / positives.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0)
    torch.testing.assert_close(loss, 0.5 * (by_image.mean() + by_text.mean()))
    plain = clip_loss(model, batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                      batch["caption_ids"][:, None] == batch["caption_ids"][None, :])  # fmt: skip
    assert not torch.allclose(loss, plain)  # it recolours and recaptions


def test_a_colour_free_caption_describes_plain_and_recoloured_images_alike():
    # Entries: a face (drawn), another red face on the same background (recoloured), a star
    # (drawn), the first face's caption again (drawn). Full captions 0, 1, 2, 0; colour-free
    # captions "a face", "a face", "one star", "a face".
    captions, free = torch.tensor([0, 1, 2, 0]), torch.tensor([0, 0, 1, 0])
    recoloured = torch.tensor([False, True, False, False])
    expected = torch.tensor([
        # text: full 0, "a face", full 2, full 0
        [True, True, False, True],  # a drawn face is "a face" too
        [False, True, False, False],  # a recoloured face is no longer its full caption
        [False, False, True, False],
        [True, True, False, True],
    ])  # fmt: skip
    assert torch.equal(recoloured_positives(captions, free, recoloured), expected)
    # Negative control: ids of the two kinds kept apart would push a drawn face from "a face".
    apart = torch.where(recoloured, free + 100, captions)
    assert not torch.equal(apart[:, None] == apart[None, :], expected)


def test_colour_free_captions_name_what_a_recolouring_keeps():
    def attributes(**named):
        defaults = {"background": "gray", "colour": "red", "count": "1", "container": "none",
                    "container_colour": "none"}  # fmt: skip
        return defaults | named

    assert colour_free_caption(attributes(shape="star", count="2")) == "two stars"
    assert colour_free_caption(attributes(shape="circle")) == "one circle"
    assert colour_free_caption(attributes(shape="face")) == "a face"
    held = attributes(shape="ring", container="cup", container_colour="blue")
    assert colour_free_caption(held) == "a ring in a cup"
