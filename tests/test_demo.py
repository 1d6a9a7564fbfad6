"""The demo model: procedural videos, the word encoder, the shipped weights, training, and `generate` on it."""

import json

import imageio.v3 as iio
import pytest
import torch
from click.testing import CliRunner

from saexport.artifacts import Topology
from saexport.cli import main
from saexport.demo.train import TrainingCall, TrainSettings, train
from saexport.demo.videos import VOCABULARY, is_held_out, render, scenes
from saexport.errors import SaexportError
from saexport.models.checkpoint import load_model
from saexport.models.presets import get_preset
from saexport.models.text_encoder import encode_prompts
from saexport.models.word_encoder import WordEncoder
from saexport.topology.prompts import builtin_prompts
from tests.conftest import denoise_held_out_video

DEMO = get_preset("wan2.1-demo")
WEIGHTS = DEMO.bundled_weights


def test_videos_follow_their_captions_and_seeds():
    batch = scenes(6, seed=3)
    assert [s.caption() for s in batch] == [s.caption() for s in scenes(6, seed=3)]
    assert all(set(s.caption().split()) <= set(VOCABULARY) for s in batch)
    a, b = render(batch, 5, 24, 32, seed=1), render(batch, 5, 24, 32, seed=1)
    assert a.shape == (6, 3, 5, 24, 32) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0.2
    assert (a[:, :, 1:] - a[:, :, :-1]).abs().mean() > 1e-3  # things move
    assert not torch.equal(a, render(batch, 5, 24, 32, seed=2))  # the seed places them


def test_held_out_captions_are_never_training_captions():
    train_captions = {s.caption() for s in scenes(300, seed=0)}
    test = scenes(20, seed=0, held_out=True)
    assert all(is_held_out(s.caption()) for s in test) and not any(is_held_out(c) for c in train_captions)
    assert not train_captions & {s.caption() for s in test}
    calibration = builtin_prompts(DEMO, WEIGHTS, 50)
    assert len(set(calibration)) > 40 and not any(is_held_out(c) for c in calibration)


def test_word_encoder_contract(tmp_path):
    encoder = WordEncoder(list(VOCABULARY), 8, 6)
    embedded = encoder.encode(["a red circle", "a circle red", ""])
    assert embedded.shape == (3, 6, 8)
    assert embedded[0, :3].abs().amin(-1).min() > 0 and embedded[0, 3:].abs().max() == 0  # zeros past the end
    assert embedded[2].abs().max() == 0  # the empty prompt: all zeros
    assert not torch.allclose(embedded[0], embedded[1])  # word order matters
    with pytest.raises(SaexportError, match="does not know the words dragon"):
        encoder.encode(["a red dragon"])
    with pytest.raises(SaexportError, match="at most 6"):
        encoder.encode(["a red circle and a red circle"])
    encoder.save(tmp_path)
    assert torch.equal(WordEncoder.load(tmp_path).encode(["a red circle"]), embedded[:1])
    (tmp_path / "text_encoder" / "model.safetensors").write_bytes(b"corrupt")
    with pytest.raises(SaexportError, match="not a readable word-embedding text encoder"):
        WordEncoder.load(tmp_path)


def test_shipped_weights_are_small_and_recorded():
    size = sum(f.stat().st_size for f in WEIGHTS.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    record = json.loads((WEIGHTS / "training.json").read_text())
    assert record["model"] == "wan2.1-demo" and record["steps_run"] == record["settings"]["steps"] > 1000
    assert record["loss_curve"][-1][1] < record["loss_curve"][0][1] / 5


def test_demo_model_denoises_a_held_out_video():
    """Trained weights turn a noised unseen video back towards it; random weights would not."""
    loaded, _, estimate_error, noisy_error = denoise_held_out_video("wan2.1-demo", frames=16, height=32, width=32)
    assert loaded.path == WEIGHTS
    assert estimate_error < 0.25 * noisy_error


def test_training_writes_a_loadable_checkpoint(tmp_path):
    settings = TrainSettings(frames=2, height=16, width=16, batch=2, warmup=1, steps=2)
    record = train(settings, TrainingCall(tmp_path))
    assert record["steps_run"] == 2
    loaded = load_model("wan2.1-demo", tmp_path)
    assert loaded.weights_id != load_model("wan2.1-demo").weights_id
    assert encode_prompts(tmp_path, ["a red circle moving left on blue stripes"], max_length=DEMO.text_len).shape == (
        1, DEMO.text_len, DEMO.config["text_dim"])


@pytest.mark.slow
def test_build_and_generate_a_gif_with_the_demo_defaults(tmp_path):
    runner = CliRunner()
    small = ["--resolution", "16x16", "--frames", "2", "--block-size", "16", "--layout", "tile3d:1x4x4",
             "--steps", "2", "--prompts", "1", "--rows-per-block", "4", "--device", "cpu", "--density", "0.3"]
    result = runner.invoke(main, ["build", *small, "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    calibration = Topology.load(tmp_path / "topology.safetensors").calibration
    assert "built-in prompts, text encoder" in calibration["embeddings"]  # the demo's captions, its encoder
    gif = tmp_path / "video.gif"
    result = runner.invoke(main, ["generate", "--artifacts", str(tmp_path), "--prompt",
                                  "a red circle moving left on blue stripes", "--upscale", "3", "--out", str(gif)],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    frames = iio.imread(gif)
    assert frames.shape == (2, 48, 48, 3) and frames.std() > 10
    result = runner.invoke(main, ["generate", "--artifacts", str(tmp_path), "--prompt", "a red dragon",
                                  "--out", str(gif)])
    assert result.exit_code == 2 and "does not know the words dragon" in result.output
