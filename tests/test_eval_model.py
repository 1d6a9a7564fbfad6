"""The evaluation model: its videos (textured objects, local content), its training script's resumable runs,
and its shipped weights."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from dataclasses import replace

import pytest
import torch

import saexport.demo.train as train_module
from saexport.demo.objects import (
    MAX_WORDS,
    PHRASE_STARTS,
    VOCABULARY,
    ObjectSpec,
    Scene,
    is_held_out,
    render,
    scenes,
)
from saexport.demo.train import Trainer, TrainingCall, TrainSettings, extended, lr_factor, train
from saexport.errors import SaexportError
from saexport.models.checkpoint import load_model
from saexport.models.presets import get_preset
from saexport.models.video_shape import parse_video_shape
from saexport.models.word_encoder import WordEncoder
from tests.conftest import denoise_held_out_video

EVAL = get_preset("wan2.1-eval")
WEIGHTS = EVAL.bundled_weights


def tiny_run(**changes) -> TrainSettings:
    """A two-stage run small enough for the CPU (8x8, then 16x16, two frames, held-out loss every step)."""
    base = TrainSettings(frames=2, height=16, width=16, batch=2, low_height=8, low_width=8, low_batch=2, warmup=1,
                         eval_videos=2, eval_every=1)
    return replace(base, **changes)


def test_videos_follow_their_captions_and_seeds():
    batch = scenes(8, seed=3)
    assert [s.caption() for s in batch] == [s.caption() for s in scenes(8, seed=3)]
    for scene in batch:
        assert 2 <= len(scene.objects) <= 4
        colours = [o.colour for o in scene.objects]
        assert len(set(colours)) == len(colours) and scene.background not in colours  # a checker finds each one
    a, b = render(batch, 5, 24, 32, seed=1), render(batch, 5, 24, 32, seed=1)
    assert a.shape == (8, 3, 5, 24, 32) and a.dtype == torch.float32 and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0.2
    assert (a[:, :, 1:] - a[:, :, :-1]).abs().mean() > 1e-3  # things move
    assert not torch.equal(a, render(batch, 5, 24, 32, seed=2))  # the seed places them
    # One scene at two resolutions: the low-resolution stage of training sees the same videos, smaller.
    large, small = render(batch, 3, 64, 64, seed=1), render(batch, 3, 32, 32, seed=1)
    pooled = torch.nn.functional.avg_pool3d(large, (1, 2, 2))
    assert (pooled - small).abs().mean() < 0.05


def test_captions_use_the_closed_vocabulary_and_fit_the_text_encoder():
    captions = [s.caption() for s in scenes(300, seed=0)]
    assert all(set(c.split()) <= set(VOCABULARY) for c in captions)
    assert max(len(c.split()) for c in captions) <= MAX_WORDS <= EVAL.text_len
    encoded = WordEncoder(list(VOCABULARY), EVAL.config["text_dim"], EVAL.text_len).encode(captions[:5])
    assert encoded.shape == (5, EVAL.text_len, EVAL.config["text_dim"])
    assert len(set(captions)) > 290  # a large caption space: held-out captions are new combinations


def test_held_out_captions_are_never_training_captions():
    train_captions = {s.caption() for s in scenes(500, seed=0)}
    test = scenes(30, seed=0, held_out=True)
    assert all(is_held_out(s.caption()) for s in test) and not any(is_held_out(c) for c in train_captions)
    assert not train_captions & {s.caption() for s in test}


def test_objects_move_as_captioned_under_a_pan():
    """The truth a caption checker relies on: an object's screen motion follows its caption even while the
    camera pans the other way, and a later object is drawn over an earlier one."""
    scene = Scene((ObjectSpec("circle", "red", "right"), ObjectSpec("square", "blue", "up")), "green", "clouds",
                  pan="right")  # the picture moves left, slower than the objects
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")

    def centre(mask: torch.Tensor, frame: int) -> tuple[float, float]:
        weight = mask[frame].float()
        return float((weight * xs).sum() / weight.sum()), float((weight * ys).sum() / weight.sum())

    for seed in range(4):
        video = (render([scene], 16, 64, 64, seed=seed)[0] + 1) / 2  # [3, frames, H, W]
        red = (video[0] > 0.6) & (video[1] < 0.3) & (video[2] < 0.3)
        blue = (video[2] > 0.6) & (video[0] < 0.3)
        assert centre(red, -1)[0] > centre(red, 0)[0] + 5
        assert centre(blue, -1)[1] < centre(blue, 0)[1] - 5


def test_noise_backgrounds_are_not_periodic():
    """Pixels far apart (8 to 32 of 64) barely correlate on noise backgrounds: nothing repeats across the frame."""
    batch = [s for s in scenes(80, seed=1) if s.kind == "noise"][:12]
    frame = render(batch, 1, 64, 64, seed=0)[:, :, 0]
    peaks = []
    for d in range(8, 33):
        for a, b in ((frame[..., :, :-d], frame[..., :, d:]), (frame[..., :-d, :], frame[..., d:, :])):
            a, b = a - a.mean((-2, -1), keepdim=True), b - b.mean((-2, -1), keepdim=True)
            peaks.append(((a * b).mean((-2, -1)) / (a.std((-2, -1)) * b.std((-2, -1)))).mean(1).abs())
    assert torch.stack(peaks).amax(0).mean() < 0.35


def test_training_resumes_exactly_and_writes_sharded_weights(tmp_path):
    """Two calls of a resumable run give the weights one call gives; weights over SHARD_BYTES are sharded."""

    def settings() -> TrainSettings:
        return tiny_run(low_steps=2, steps=1)

    whole = train(settings(), TrainingCall(tmp_path / "whole", model="wan2.1-eval", resume_dir=tmp_path / "a"))
    first = train(settings(), TrainingCall(tmp_path / "split", model="wan2.1-eval", resume_dir=tmp_path / "b",
                                           call_steps=2))
    assert (first["status"], first["steps_run"]) == ("paused", 2)
    second = train(TrainSettings(), TrainingCall(tmp_path / "split", model="wan2.1-eval",
                                                 resume_dir=tmp_path / "b"))  # the saved settings win
    assert (whole["status"], second["status"], second["steps_run"]) == ("finished", "finished", 3)
    assert [e["loss"] for e in second["held_out_loss"]] == [e["loss"] for e in whole["held_out_loss"]]
    assert len(second["calls"]) == 2
    shards = sorted((tmp_path / "split" / "transformer").glob("*.safetensors"))
    assert len(shards) == 3 and all(f.stat().st_size <= 15 * 2**20 for f in shards)
    a, b = load_model("wan2.1-eval", tmp_path / "whole"), load_model("wan2.1-eval", tmp_path / "split")
    assert all(torch.equal(x, y) for x, y in zip(a.transformer.state_dict().values(),
                                                 b.transformer.state_dict().values(), strict=True))


def test_a_finished_run_extends_past_its_plan_at_its_final_learning_rate(tmp_path):
    """--extend-to: a finished run trains on to a later step, from its saved state or from its weights alone,
    with the schedule of its planned steps unchanged and its final learning rate held after them."""
    planned = tiny_run(low_steps=2, steps=2)
    done = train(planned, TrainingCall(tmp_path / "run", model="wan2.1-eval", resume_dir=tmp_path / "state"))
    assert (done["status"], done["steps_run"]) == ("finished", 4)
    shutil.copytree(tmp_path / "run", tmp_path / "weights_only")
    more = train(TrainSettings(), TrainingCall(tmp_path / "run", model="wan2.1-eval", resume_dir=tmp_path / "state",
                                               extend_to=6))
    assert (more["status"], more["steps_run"], more["settings"]["extra_steps"]) == ("finished", 6, 2)
    assert [call["steps"] for call in more["calls"]] == [[0, 4], [4, 6]]
    assert [e["step"] for e in more["held_out_loss"]][-2:] == [5, 6]
    warm = train(TrainSettings(), TrainingCall(tmp_path / "warm", model="wan2.1-eval",
                                               warm_start=tmp_path / "weights_only", extend_to=5))
    assert (warm["status"], warm["steps_run"]) == ("finished", 5)
    longer = extended(planned, 6)
    assert [lr_factor(step, longer, 6) for step in (1, 2, 3, 4)] == [lr_factor(step, planned, 4) for step in
                                                                       (1, 2, 3, 4)]
    assert lr_factor(5, longer, 6) == lr_factor(6, longer, 6) == planned.final_lr_fraction
    assert extended(planned, 3).extra_steps == 0  # never before the plan's own end
    with pytest.raises(ValueError, match="extend_to continues a run"):
        train(planned, TrainingCall(tmp_path / "new", model="wan2.1-eval", resume_dir=tmp_path / "empty",
                                    extend_to=6))


def test_phrase_context_binds_each_object_s_words_to_its_colour(tmp_path):
    """With phrase context a word's vector is its table vector plus its position's plus the mean of its phrase's
    table vectors: "red" knows its circle and motion, and nothing of the other objects' words."""
    torch.manual_seed(0)
    phrases = WordEncoder(list(VOCABULARY), 16, MAX_WORDS, PHRASE_STARTS)
    tables = WordEncoder(list(VOCABULARY), 16, MAX_WORDS)
    tables.load_state_dict(phrases.state_dict())  # the same weights: phrase context adds none
    prompts = ["a red circle moving left and a blue square on green clouds",
               "a red circle moving left and a blue ring on green clouds",
               "a red square moving left and a blue circle on green clouds", ""]
    embedded, plain = phrases.encode(prompts), tables.encode(prompts)
    red, blue = 1, 7
    assert embedded[0, red].equal(embedded[1, red])  # the same phrase: "and a blue ..." is another one
    assert (embedded[0, blue] - embedded[1, blue]).abs().max() > 1e-3  # blue's shape changed
    assert (embedded[0, red] - embedded[2, red]).abs().max() > 1e-3  # and red's
    assert plain[0, red].equal(plain[2, red])  # the tables alone: a bag of words
    ids = phrases.tokenizer(["a red circle moving left"])[0, :5]
    phrase_mean = phrases.words.weight[ids].mean(0).detach()
    assert torch.allclose(embedded[0, red] - plain[0, red], phrase_mean, atol=1e-6)
    assert embedded[0, 12:].abs().max() == 0 and embedded[3].abs().max() == 0  # past the end; the empty prompt
    phrases.save(tmp_path)
    assert WordEncoder.load(tmp_path).phrase_starts == PHRASE_STARTS
    assert torch.equal(WordEncoder.load(tmp_path).encode(prompts), embedded)
    assert WordEncoder.load(WEIGHTS).phrase_starts == PHRASE_STARTS  # the shipped weights were trained with it
    with pytest.raises(ValueError, match="not in the vocabulary"):
        WordEncoder(list(VOCABULARY), 16, MAX_WORDS, ("with",))
    config = json.loads((tmp_path / "text_encoder" / "config.json").read_text())
    (tmp_path / "text_encoder" / "config.json").write_text(json.dumps({**config, "phrase_starts": ["with"]}))
    with pytest.raises(SaexportError, match="not a readable word-embedding text encoder"):
        WordEncoder.load(tmp_path)


def test_a_warm_start_fine_tunes_with_phrase_context(tmp_path):
    """--warm-start --phrase-context --extend-lr: the checkpoint's tables kept under phrase context, the learning
    rate warming up again to --extend-lr; a resumed run keeps its encoder."""
    planned = tiny_run(low_steps=1, steps=1)
    train(planned, TrainingCall(tmp_path / "tables", model="wan2.1-eval", resume_dir=tmp_path / "state"))
    tuned = train(TrainSettings(), TrainingCall(tmp_path / "tuned", model="wan2.1-eval",
                                                warm_start=tmp_path / "tables", extend_to=4, phrase_context=True,
                                                extend_lr=1e-3))
    assert (tuned["status"], tuned["steps_run"]) == ("finished", 4)
    settings = TrainSettings(**tuned["settings"])
    assert (settings.phrase_context, settings.restart_step, settings.extend_lr) == (True, 2, 1e-3)
    assert WordEncoder.load(tmp_path / "tuned").phrase_starts == PHRASE_STARTS
    record = json.loads((tmp_path / "tables" / "training.json").read_text())
    fresh = Trainer("wan2.1-eval", replace(settings, restart_step=0), "cpu")
    fresh.warm_start(tmp_path / "tables", record)
    assert fresh.ema_encoder.words.weight.equal(WordEncoder.load(tmp_path / "tables").words.weight)
    # 10 planned steps, 10 more at extend_lr, warm-started at step 12 with a 2-step warm-up
    fine_tune = TrainSettings(steps=10, warmup=2, extra_steps=10, extend_lr=1e-3, restart_step=12)
    assert [lr_factor(step, fine_tune, 20) * fine_tune.lr for step in (13, 14, 20)] == pytest.approx([5e-4, 1e-3, 1e-3])
    with pytest.raises(ValueError, match="a resumed run keeps its encoder"):
        train(TrainSettings(), TrainingCall(tmp_path / "resumed", model="wan2.1-eval", resume_dir=tmp_path / "state",
                                            extend_to=5, phrase_context=True))


def test_the_edge_term_adds_the_squared_error_of_the_estimate_s_spatial_gradients(tmp_path, monkeypatch, capsys):
    """flow_loss's edge term, against the same sums written out per pixel pair on the same prediction; a warm start
    with an edge weight records it, its held-out loss leaves the term out, and a negative or non-finite weight is
    refused."""
    torch.manual_seed(3)
    trainer = Trainer("wan2.1-eval", tiny_run(), "cpu")
    x0, noise = torch.rand(2, 3, 2, 8, 8) * 2 - 1, torch.randn(2, 3, 2, 8, 8)
    tokens, sigma = trainer.encoder.tokenizer(["a red circle moving left", "a blue ring"]), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        plain = train_module.flow_loss(trainer.model, trainer.encoder, x0, tokens, sigma, noise)
        edged = train_module.flow_loss(trainer.model, trainer.encoder, x0, tokens, sigma, noise, edge_weight=0.5)
        s = sigma.view(-1, 1, 1, 1, 1)
        pred = trainer.model((1 - s) * x0 + s * noise, sigma * 1000, trainer.encoder(tokens), return_dict=False)[0]
    estimate_error = -s * (pred - (noise - x0))  # the clean-video estimate x_t - sigma * pred, minus x0
    dx = (estimate_error[..., :, 1:] - estimate_error[..., :, :-1]) / s
    dy = (estimate_error[..., 1:, :] - estimate_error[..., :-1, :]) / s
    assert float(plain) == pytest.approx(float((pred - (noise - x0)).square().mean()), rel=1e-5)
    assert float(edged - plain) == pytest.approx(0.5 * float(dx.square().mean() + dy.square().mean()), rel=1e-4)
    assert float(edged - plain) > 0.1 * float(plain)  # a term that weighs: not rounding
    train(tiny_run(low_steps=1, steps=1), TrainingCall(tmp_path / "plain", model="wan2.1-eval"))
    tuned = train(TrainSettings(), TrainingCall(tmp_path / "edged", model="wan2.1-eval", warm_start=tmp_path / "plain",
                                                extend_to=3, edge_weight=0.5))
    assert TrainSettings(**tuned["settings"]).edge_weight == 0.5
    held_out = [Trainer("wan2.1-eval", tiny_run(edge_weight=w), "cpu").held_out_loss(16, 16) for w in (0.0, 0.5)]
    assert held_out[0] == held_out[1]  # the same initial weights (the run's seed): the edge term is not in it
    for bad in ("-1", "nan", "inf"):
        monkeypatch.setattr("sys.argv", ["train", "--model", "wan2.1-eval", "--out", str(tmp_path / "bad"),
                                         "--warm-start", str(tmp_path / "plain"), "--edge-weight", bad])
        with pytest.raises(SystemExit) as refused:
            train_module.main()
        assert refused.value.code == 2
        assert "--edge-weight is a weight of the loss: 0 or more, finite" in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


def test_past_plateau_records_the_plateau_and_trains_on_to_the_plan_end(tmp_path):
    """A tolerance no evaluation can beat makes the run plateau as soon as the rule can tell (step 2);
    --past-plateau records the plateau and trains on to the planned last step."""
    flat = tiny_run(low_height=0, low_width=0, steps=4, plateau_evals=1, plateau_tolerance=1.0)
    stopped = train(flat, TrainingCall(tmp_path / "stopped", model="wan2.1-demo"))
    assert (stopped["status"], stopped["steps_run"], stopped["plateaued"]) == ("plateau", 2, True)
    onward = train(flat, TrainingCall(tmp_path / "onward", model="wan2.1-demo", past_plateau=True))
    assert (onward["status"], onward["steps_run"], onward["plateaued"]) == ("finished", 4, True)
    assert [e["step"] for e in onward["held_out_loss"]] == [0, 1, 2, 3, 4]


def test_slow_steps_print_a_line_each_and_fast_ones_every_100_steps(tmp_path, monkeypatch, capsys):
    """Steps slower than PROGRESS_SECONDS (a CPU) get a progress line each; fast ones only every 100 steps."""
    run = tiny_run(low_height=0, low_width=0, steps=3)
    train(run, TrainingCall(tmp_path / "fast", model="wan2.1-demo"))
    assert "(this step)" not in capsys.readouterr().out
    monkeypatch.setattr(train_module, "PROGRESS_SECONDS", -1.0)
    train(run, TrainingCall(tmp_path / "slow", model="wan2.1-demo"))
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if "(this step)" in line]
    assert [line[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all(math.isfinite(float(line[3])) for line in lines)


def test_a_cpu_run_that_would_not_fit_in_memory_is_refused_before_it_starts(tmp_path, monkeypatch):
    """The OOM killer ends a process without a word: a CPU run whose measured step exceeds the memory available
    is refused with the numbers, before anything is written."""
    monkeypatch.setattr(train_module, "available_memory", lambda: 2**20)  # 1 MiB: no step fits
    with pytest.raises(ValueError, match=r"x 4 videos needs about .* GiB on the CPU .* 0\.0 GiB is available"):
        train(tiny_run(low_height=0, low_width=0, steps=1, batch=4),
              TrainingCall(tmp_path / "run", model="wan2.1-demo", resume_dir=tmp_path / "state"))
    assert not (tmp_path / "run").exists() and not (tmp_path / "state").exists()


def test_the_successor_candidate_sees_the_same_token_grid_in_4x4_pixel_tokens(tmp_path):
    """wan2.1-eval2 cuts twice the pixels into the same 16x32x32 grid as wan2.1-eval; a run of it writes a checkpoint
    that loads with 4x4-pixel patches and predicts a whole video from it."""
    successor = get_preset("wan2.1-eval2")
    grids = [parse_video_shape(p.defaults.resolution, p.defaults.frames, p.codec).token_grid(p.patch_size)
             for p in (EVAL, successor)]
    assert grids == [(16, 32, 32), (16, 32, 32)] and successor.patch_size == (1, 4, 4)
    record = train(tiny_run(low_steps=1, steps=1), TrainingCall(tmp_path / "run", model="wan2.1-eval2"))
    assert (record["status"], record["steps_run"]) == ("finished", 2)
    model = load_model("wan2.1-eval2", tmp_path / "run")
    assert tuple(model.transformer.config.patch_size) == (1, 4, 4)
    video = render(scenes(1, seed=5, held_out=True), 2, 16, 16, seed=5)
    prediction = model.transformer(video, timestep=torch.tensor([500.0]),
                                   encoder_hidden_states=torch.randn(1, successor.text_len,
                                                                     successor.config["text_dim"]),
                                   return_dict=False)[0]
    assert prediction.shape == video.shape and torch.isfinite(prediction).all()


def test_shipped_weights_are_small_sharded_and_recorded():
    files = [f for f in WEIGHTS.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 36 * 2**20  # the working tree must stay under 64 MiB
    assert all(f.stat().st_size <= 15 * 2**20 for f in files)  # files come back from the GPU machine <= 16 MiB
    record = json.loads((WEIGHTS / "training.json").read_text())
    assert record["model"] == "wan2.1-eval" and record["status"] in ("finished", "plateau", "paused")
    settings = record["settings"]
    assert settings["low_steps"] + settings["steps"] < record["steps_run"] <= (
        settings["low_steps"] + settings["steps"] + settings["extra_steps"])  # trained on past its first plan
    calls = [call["steps"] for call in record["calls"]]  # one lineage from step 0, every call's steps recorded
    assert calls[0][0] == 0 and calls[-1][1] == record["steps_run"]
    assert all(before[1] == after[0] for before, after in itertools.pairwise(calls))
    held_out = record["held_out_loss"]
    assert held_out[-1]["loss"] < held_out[0]["loss"] / 20


def test_shipped_weights_load_and_denoise_a_held_out_video_on_cpu():
    """The shipped weights give a finite prediction that turns a noised unseen video back towards it (on a
    smaller video than the model's 64x64x16: RoPE lets the grid change, and the CPU stays quick)."""
    loaded, flow, estimate_error, noisy_error = denoise_held_out_video("wan2.1-eval", frames=4, height=64, width=64)
    assert loaded.path == WEIGHTS
    assert flow.shape == (1, 3, 4, 64, 64) and flow.isfinite().all()
    assert estimate_error < 0.25 * noisy_error
