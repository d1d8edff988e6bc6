"""Evaluation on generated speech: a tiny model fine-tuned on the bundled voices against the tiny Base model.

The tiny models speak noise-like audio, so the numbers say nothing about quality; the tests check what the runner
promises: what is generated and how (seeded, bounded, the stock call for each model type), that perplexity is the
teacher-forced cross-entropy of the step, that each number names its scorer, that scorers that cannot load are
reported with the reason instead of being replaced, and that the files (JSON, Markdown, TensorBoard) hold it all
without the HF token.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import REPO_ROOT, make_settings, subprocess_env

from finetuning.constants import SAMPLE_RATE
from finetuning.evaluation.listening import CURVES_FILE, HTML_FILE
from finetuning.evaluation.metrics import metric_catalogue
from finetuning.evaluation.report import JSON_FILE, MARKDOWN_FILE, log_report, render_markdown, write_report
from finetuning.evaluation.runner import compare_checkpoints, evaluate_checkpoint, evaluate_model
from finetuning.evaluation.scorers import load_scorers
from finetuning.evaluation.speech import generate_speech, load_model, make_voice
from finetuning.evaluation.targets import load_targets

pytestmark = pytest.mark.slow  # every test reads a trained run and its evaluation reports

SPEAKERS = ("english_speaker", "swahili_speaker")
SECRET = "hf_secret_token_for_evaluation_tests"
TRAIN_STEPS = 20
MAX_SECONDS = 1.6  # 20 frames


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run tens of times faster on one thread than on several on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _settings(tmp_path, model_dir, **overrides):
    model_dir = Path(model_dir)
    values = {
        "TRAIN_SPEAKERS": ",".join(SPEAKERS),
        "VALIDATION_FRACTION": 0.34,  # 1 of 3 clips per speaker
        "BATCH_SIZE": 2,
        "GRADIENT_ACCUMULATION_STEPS": 1,
        "LEARNING_RATE": 3e-3,
        "LR_SCHEDULE": "constant",
        "WARMUP_STEPS": 0,
        "MAX_STEPS": TRAIN_STEPS,
        "LOGGING_STEPS": 10,
        "EVAL_STEPS": 0,
        "EVAL_MAX_SECONDS": MAX_SECONDS,
        "EVAL_MAX_UTTERANCES": 2,
        "HF_TOKEN": SECRET,
    }
    return make_settings(tmp_path, model_dir, **{**values, **overrides})


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """(settings, exported custom-voice checkpoint) after a short fine-tune on 3 clips per speaker, with generated
    speech evaluated during training as ``finetune.py`` sets it up."""
    from finetuning.evaluation.in_training import SpeechEvaluation
    from finetuning.preparation.prepare import prepare_dataset
    from finetuning.training.loop import train

    settings = _settings(tmp_path_factory.mktemp("evaluate"), tiny_model_dir, EVAL_GENERATE_STEPS=TRAIN_STEPS // 2)
    prepare_dataset(settings, max_samples=3, report=lambda _: None)
    return settings, train(settings, on_export=SpeechEvaluation(settings)).export_dir


@pytest.fixture(scope="module")
def scorers(trained):
    return load_scorers(trained[0])


@pytest.fixture(scope="module")
def comparison(trained, scorers, tiny_model_dir, tmp_path_factory):
    settings, export = trained
    output_dir = tmp_path_factory.mktemp("cmp")
    report = compare_checkpoints(export, tiny_model_dir, settings, scorers, output_dir=output_dir)
    write_report(report, output_dir, settings)
    return report


@pytest.fixture(scope="module")
def single(trained, scorers, tmp_path_factory):
    settings, export = trained
    output_dir = tmp_path_factory.mktemp("one")
    report = evaluate_checkpoint(export, settings, scorers, step=TRAIN_STEPS, output_dir=output_dir)
    write_report(report, output_dir, settings)
    return report


def test_report_structure_and_every_number_names_its_scorer(comparison):
    assert comparison["kind"] == "comparison"
    candidate, baseline = comparison["candidate"], comparison["baseline"]
    assert candidate["checkpoint"]["model_type"] == "custom_voice"
    assert baseline["checkpoint"]["model_type"] == "base"
    assert candidate["checkpoint"]["layout"] == baseline["checkpoint"]["layout"] == "non_streaming"
    catalogue = metric_catalogue()
    assert all(info["range"] and info["better"] for info in catalogue.values())
    for run in (candidate, baseline):
        assert list(run["speakers"]) == list(SPEAKERS)
        assert run["generation"]["max_new_tokens"] == math.ceil(MAX_SECONDS * 12.5)
        for metric, info in run["metrics"].items():
            assert info["scorer"] == run["scorers"][info["group"]]["backend"], metric
        for speaker, section in run["speakers"].items():
            assert section["split"] == "validation" and len(section["utterances"]) == 1
            for mean in list(section["means"].values()) + list(section["real_audio"].values()):
                assert isinstance(mean["scorer"], str) and mean["scorer"], (speaker, mean)
            for utterance in section["utterances"]:
                assert set(utterance["values"]) <= set(catalogue)
                assert utterance["values"]["perplexity_codec0"] >= 1.0
                assert utterance["values"]["perplexity_sub_talker"] >= 1.0
                for metric, value in utterance["values"].items():
                    assert value is not None or metric in utterance["errors"], metric  # a null says why
                wav, sample_rate = sf.read(f"{run['output_dir']}/{utterance['audio']}")
                assert sample_rate == SAMPLE_RATE and wav.size / SAMPLE_RATE == pytest.approx(utterance["generated_s"])
                assert 0 < utterance["generated_frames"] < run["generation"]["max_new_tokens"]
    assert "generate_custom_voice" in candidate["speakers"]["english_speaker"]["conditioning"]
    assert "x_vector_only_mode=True" in baseline["speakers"]["english_speaker"]["conditioning"]
    for rows in comparison["difference"].values():
        for row in rows.values():
            if row["difference"] is not None:
                assert row["difference"] == pytest.approx(row["candidate"] - row["baseline"])
                assert row["verdict"] in ("better", "worse", "same")


def test_unavailable_scorers_and_languages_are_reported_with_reasons(comparison):
    run = comparison["candidate"]
    speaker_scorer, asr = run["scorers"]["speaker_similarity"], run["scorers"]["pronunciation"]
    assert speaker_scorer["backend"] == "resemblyzer-ge2e"
    assert "spkrec-ecapa-voxceleb" in speaker_scorer["skipped"]["ecapa"]
    assert asr["backend"] == "pocketsphinx-en-us"
    assert "whisper-small" in asr["skipped"]["transformers"]
    english, swahili = run["speakers"]["english_speaker"], run["speakers"]["swahili_speaker"]
    assert english["means"]["wer"]["scorer"] == "pocketsphinx-en-us" and english["means"]["wer"]["n"] == 1
    assert "swahili" in swahili["unavailable"]["pronunciation"]
    assert "wer" not in swahili["means"] and "wer" not in swahili["utterances"][0]["values"]
    markdown = render_markdown(comparison)
    assert swahili["unavailable"]["pronunciation"] in markdown
    assert asr["skipped"]["transformers"] in markdown


def test_named_backend_that_cannot_load_is_unavailable_not_replaced(trained, tmp_path):
    settings, _ = trained
    custom = _settings(
        tmp_path,
        settings.INIT_MODEL_PATH,
        DATASET_DIR=settings.DATASET_DIR,
        SPEAKER_SIM_BACKEND="ecapa",
        ECAPA_SOURCE=tmp_path / "no-ecapa",
        ASR_BACKEND="transformers",
        ASR_MODEL=tmp_path / "no-asr",
        NATURALNESS_BACKEND="none",
    )
    scorers = load_scorers(custom)
    assert scorers.speaker is None and scorers.asr is None and scorers.naturalness is None
    assert "NATURALNESS_BACKEND=none" in scorers.describe()["naturalness"]["unavailable"]
    described = scorers.describe()
    assert described["speaker_similarity"]["backend"] is None
    assert "no-ecapa" in described["speaker_similarity"]["unavailable"]
    assert "no-asr" in described["pronunciation"]["unavailable"]
    target = load_targets(custom, ["english_speaker"], scorers)["english_speaker"]
    assert "no-ecapa" in target.unavailable["speaker_similarity"] and "no-asr" in target.unavailable["pronunciation"]
    assert target.real == [{"values": {}, "errors": {}}]


def test_perplexity_is_exp_of_the_steps_cross_entropy(comparison, trained):
    """Recomputed for one utterance through step.build_talker_inputs/talker_forward, with the checkpoint's speaker
    row (custom voice) or the reference clip's x-vector (Base), in the layout the checkpoint was trained with."""
    import qwen_tts

    from finetuning.training.data import load_split
    from finetuning.training.export import read_info
    from finetuning.training.step import assistant_text, build_talker_inputs, language_id_for, talker_forward

    settings, export = trained
    row = load_split(settings, "english_speaker", "validation")[0]
    reference = np.asarray(load_split(settings, "english_speaker", "reference")[0]["audio"]["array"], "float32")
    from finetuning.evaluation.speech import speaking_layout

    layout = speaking_layout(read_info(export)["training_layout"], "custom_voice")  # what evaluation speaks in
    for role, path in (("candidate", export), ("baseline", settings.INIT_MODEL_PATH)):
        model = qwen_tts.Qwen3TTSModel.from_pretrained(str(path))
        inner = model.model
        if role == "candidate":
            speaker_row = inner.config.talker_config.spk_id["english_speaker"]
            embed = inner.talker.get_input_embeddings().weight[speaker_row]
        else:
            embed = inner.extract_speaker_embedding(reference, SAMPLE_RATE)
        text_ids = model.processor.tokenizer(assistant_text(row["text"]), return_tensors="pt")["input_ids"][0]
        with torch.no_grad():
            inputs = build_talker_inputs(
                inner,
                [text_ids],
                [torch.tensor(np.asarray(row["audio_codes"]), dtype=torch.long)],
                embed.view(1, -1),
                [language_id_for(inner.config.talker_config, row["language"])],
                layout=layout,
            )
            out = talker_forward(inner, inputs)
        reported = comparison[role]["speakers"]["english_speaker"]["utterances"][0]
        assert reported["id"] == row["id"]
        assert reported["values"]["perplexity_codec0"] == pytest.approx(math.exp(out.codec0_loss.item()), rel=1e-5)
        assert reported["values"]["perplexity_sub_talker"] == pytest.approx(
            math.exp(out.sub_talker_loss.item()), rel=1e-5
        )
        assert reported["tokens"]["perplexity_codec0"] == len(row["audio_codes"]) + 1  # frames + EOS


def test_generation_is_seeded_and_leaves_the_callers_rng_alone(comparison, single, trained, scorers):
    first, second = comparison["candidate"], single
    for speaker in SPEAKERS:
        a, b = first["speakers"][speaker]["utterances"][0], second["speakers"][speaker]["utterances"][0]
        assert a["seed"] == b["seed"]
        assert a["values"]["perplexity_codec0"] == b["values"]["perplexity_codec0"]
        assert a["generated_frames"] == b["generated_frames"]
        wav_a = sf.read(f"{first['output_dir']}/{a['audio']}")[0]
        wav_b = sf.read(f"{second['output_dir']}/{b['audio']}")[0]
        np.testing.assert_array_equal(wav_a, wav_b)

    settings, export = trained
    wrapper = load_model(export, settings)
    target = load_targets(settings, ["english_speaker"], scorers)["english_speaker"]
    voice = make_voice(wrapper, "english_speaker", target, non_streaming=True)
    text = target.utterances[0].text
    state = torch.random.get_rng_state()
    clips = [generate_speech(voice, text, "english", seed, 12, "cpu") for seed in (7, 7, 8)]
    assert torch.equal(state, torch.random.get_rng_state())
    np.testing.assert_array_equal(clips[0], clips[1])
    assert clips[0].shape != clips[2].shape or not np.array_equal(clips[0], clips[2])


def test_files_hold_the_report_and_never_the_token(comparison, single):
    for report in (comparison, single):
        out = report["output_dir"]
        saved = json.loads(open(f"{out}/{JSON_FILE}").read())
        assert saved["kind"] == report["kind"]
        markdown = open(f"{out}/{MARKDOWN_FILE}").read()
        for speaker in SPEAKERS:
            assert f"## {speaker}" in markdown
        assert "resemblyzer-ge2e" in markdown and "pocketsphinx-en-us" in markdown
        runs = [saved] if saved["kind"] == "evaluation" else [saved["baseline"], saved["candidate"]]
        for run in runs:
            assert "HF_TOKEN" not in run["settings"] and run["settings"]["SEED"] == 42
        for path in sorted(os.listdir(out)):
            if path.endswith((".json", ".md", ".html")):
                assert SECRET not in open(f"{out}/{path}").read(), path
    assert "candidate - baseline" in open(f"{comparison['output_dir']}/{MARKDOWN_FILE}").read()
    assert single["step"] == TRAIN_STEPS


def test_end_of_speech_failures_are_counted_per_speaker_and_overall(single, comparison):
    kinds = []
    for speaker, section in single["speakers"].items():
        counts = section["end_of_speech"]
        own = [u["end_of_speech"] for u in section["utterances"]]
        assert counts["n"] == len(own) > 0 and counts["seconds_per_char"] > 0, speaker
        assert (
            counts["rate"]
            == section["means"]["eos_failure_rate"]["value"]
            == sum(k is not None for k in own) / len(own)
        )
        for u in section["utterances"]:
            assert u["end_of_speech"] == ("runaway" if u["reached_length_cap"] else u["end_of_speech"])
        kinds += own
    overall = single["end_of_speech"]["overall"]
    assert overall["n"] == len(kinds) and overall["rate"] == sum(k is not None for k in kinds) / len(kinds)
    assert set(single["end_of_speech"]["thresholds"]) >= {"runaway", "truncated", "run_on"}
    markdown = open(f"{comparison['output_dir']}/{MARKDOWN_FILE}").read()
    assert "## End of speech" in markdown and "| baseline | all |" in markdown


def test_log_report_writes_scalars_and_an_audio_sample_per_speaker(single, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb"))
    scalars = log_report(writer, single, step=TRAIN_STEPS)
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"audio": 0, "scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    for speaker in SPEAKERS:
        assert f"eval/{speaker}/perplexity_codec0" in tags["scalars"]
        assert f"eval/{speaker}/sample" in tags["audio"]
        assert f"eval/{speaker}/plots" in tags["images"]
    logged = events.Scalars("eval/english_speaker/speaker_similarity")[0]
    assert logged.step == TRAIN_STEPS
    assert logged.value == pytest.approx(scalars["eval/english_speaker/speaker_similarity"], rel=1e-6)
    assert scalars["eval/english_speaker/wer"] == single["speakers"]["english_speaker"]["means"]["wer"]["value"]

    class Tracker:  # accelerate's Accelerator / GeneralTracker interface: scalars only
        def __init__(self):
            self.logged = []

        def log(self, values, step=None):
            self.logged.append((values, step))

    tracker = Tracker()
    log_report(tracker, single, step=3)
    assert tracker.logged == [(scalars, 3)]


def test_held_out_split_falls_back_to_test_or_says_there_is_none(trained, scorers, tmp_path):
    from finetuning.preparation.prepare import prepare_dataset

    settings, _ = trained
    with_test = _settings(tmp_path / "test", settings.INIT_MODEL_PATH, VALIDATION_FRACTION=0.0, TEST_FRACTION=0.34)
    prepare_dataset(with_test, ["english_speaker"], max_samples=3, report=lambda _: None)
    target = load_targets(with_test, ["english_speaker"], scorers)["english_speaker"]
    assert target.split == "test" and len(target.utterances) == 1 and "no validation rows" in target.note

    none = _settings(tmp_path / "none", settings.INIT_MODEL_PATH, VALIDATION_FRACTION=0.0)
    prepare_dataset(none, ["english_speaker"], max_samples=3, report=lambda _: None)
    targets = load_targets(none, ["english_speaker"], scorers)
    assert targets["english_speaker"].split is None and "no validation or test rows" in targets["english_speaker"].note
    wrapper = load_model(none.INIT_MODEL_PATH, none)
    report = evaluate_model(wrapper, none, targets, scorers, none.INIT_MODEL_PATH, tmp_path / "out")
    section = report["speakers"]["english_speaker"]
    assert section["utterances"] == [] and section["means"] == {}
    assert targets["english_speaker"].note in render_markdown(report)


def _env_file(settings, path):
    lines = [f"HF_TOKEN={SECRET}"]
    for key, value in settings.public_dict().items():
        if isinstance(value, list):
            value = ",".join(value)
        elif isinstance(value, bool):
            value = str(value).lower()
        lines.append(f"{key}={value}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_writes_the_report(trained, tmp_path):
    settings, export = trained
    out = tmp_path / "cli"
    command = [sys.executable, "finetuning/evaluate.py", "--checkpoint", str(export), "--output_dir", str(out)]
    command += ["--speaker", "english_speaker", "--env-file", str(_env_file(settings, tmp_path / "eval.env"))]
    command += ["--language", "auto"]  # as stock generates without language= (english has a language id)
    done = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert str(out / JSON_FILE) in done.stdout and "english_speaker=1" in done.stdout
    report = json.loads((out / JSON_FILE).read_text())
    assert list(report["speakers"]) == ["english_speaker"]
    assert {u["generation_language"] for u in report["speakers"]["english_speaker"]["utterances"]} == {"auto"}
    assert (out / MARKDOWN_FILE).exists() and str(out / HTML_FILE) in done.stdout
    written = "".join((out / name).read_text() for name in (MARKDOWN_FILE, JSON_FILE, HTML_FILE))
    assert SECRET not in done.stdout + done.stderr + written


def test_cli_exit_codes(trained, tmp_path, capsys):
    from finetuning.evaluate import main

    settings, export = trained
    env_file = str(_env_file(settings, tmp_path / "eval.env"))
    assert main(["--checkpoint", str(export), "--env-file", env_file, "--set", "EVAL_MAX_SECONDS=0"]) == 2
    assert "EVAL_MAX_SECONDS" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "missing"), "--env-file", env_file]) == 1
    assert "no such folder" in capsys.readouterr().err
    assert main(["--checkpoint", str(export), "--env-file", env_file, "--speaker", "nobody"]) == 1
    assert "nobody" in capsys.readouterr().err


def test_lora_scales_score_each_merge_scale_side_by_side(trained, tmp_path, capsys):
    """``--lora-scales``: the export merged at each scale (a line between the Base weights and the export's) is
    evaluated, and the summary holds every scale's means; bad scales get one line."""
    from safetensors.torch import load_file

    from finetuning.evaluate import main
    from finetuning.evaluation.lora_scales import SUMMARY_JSON, write_scaled_export

    settings, export = trained
    env_file = str(_env_file(settings, tmp_path / "eval.env"))
    argv = ["--checkpoint", str(export), "--env-file", env_file, "--speaker", "english_speaker"]
    assert main([*argv, "--lora-scales", "0.5,0"]) == 2 and "outside (0, 1]" in capsys.readouterr().err
    assert main([*argv, "--lora-scales", "0.5,1", "--output_dir", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "lora_scales" / SUMMARY_JSON).read_text())
    assert list(summary["means"]) == ["0.5", "1"]
    assert all("perplexity_codec0" in summary["means"][s]["english_speaker"] for s in ("0.5", "1"))
    assert summary["means"]["0.5"] != summary["means"]["1"]
    full = write_scaled_export(export, Path(settings.INIT_MODEL_PATH), 1.0, tmp_path / "one")
    half = write_scaled_export(export, Path(settings.INIT_MODEL_PATH), 0.5, tmp_path / "half")
    exported, base = (
        load_file(str(export / "model.safetensors")),
        load_file(f"{settings.INIT_MODEL_PATH}/model.safetensors"),
    )
    at_one, at_half = load_file(str(full / "model.safetensors")), load_file(str(half / "model.safetensors"))
    name = "talker.model.layers.0.mlp.up_proj.weight"
    assert torch.equal(at_one[name], exported[name])
    torch.testing.assert_close(at_half[name], (exported[name] + base[name]) / 2, rtol=1e-6, atol=1e-7)
    assert json.loads((half / "finetune_info.json").read_text())["lora_merge_scale"] == 0.5


def test_training_evaluates_generated_speech_every_eval_generate_steps(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    settings, _ = trained
    out = Path(settings.OUTPUT_DIR)
    for step in (TRAIN_STEPS // 2, TRAIN_STEPS):  # mid-training and on the final export
        report = json.loads((out / "evaluation" / f"step-{step:06d}" / "evaluation.json").read_text())
        assert report["step"] == step and set(report["speakers"]) == set(SPEAKERS)
    events = EventAccumulator(str(out / "finetune"), size_guidance={"audio": 0, "scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert any(tag.startswith("eval/english_speaker/perplexity") for tag in tags["scalars"])
    # the curves' scalars: selection and end-of-speech failures in TensorBoard, speech metrics in metrics.jsonl too
    assert {"select/eval_loss", "select/best_step", "eval/english_speaker/eos_failure_rate"} <= set(tags["scalars"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speech_steps = [r["step"] for r in records if "eval/english_speaker/eos_failure_rate" in r]
    assert speech_steps == [TRAIN_STEPS // 2, TRAIN_STEPS]
    html = (out / "evaluation" / f"step-{TRAIN_STEPS:06d}" / HTML_FILE).read_text()
    assert "Training curves" in html and f"step {TRAIN_STEPS}, the step SELECT_BY chose" in html
    assert "eval/swahili_speaker/sample" in tags["audio"]
    assert "train/loss" in tags["scalars"]
    # in-training exports link the base model's unchanged files instead of copying them every time
    base = Path(settings.INIT_MODEL_PATH) / "speech_tokenizer" / "model.safetensors"
    linked = out / "eval_checkpoint" / "speech_tokenizer" / "model.safetensors"
    assert linked.stat().st_ino == base.stat().st_ino


class _Sources(HTMLParser):
    """Every <audio src> and <img src> of a page."""

    def __init__(self):
        super().__init__()
        self.audio, self.images = [], []

    def handle_starttag(self, tag, attrs):
        src = dict(attrs).get("src")
        if tag == "audio":
            self.audio.append(src)
        elif tag == "img":
            self.images.append(src)


@pytest.mark.parametrize("which", ["comparison", "single"])
def test_listening_report_plays_and_shows_every_utterance_from_disk(which, request):
    """evaluation.html: per utterance the real recording and each model's clip as players, one picture per model,
    every path relative to the report folder and pointing at a file that exists (a valid PNG, a 24 kHz wav)."""
    import matplotlib.image

    report = request.getfixturevalue(which)
    out = Path(report["output_dir"])
    page = (out / HTML_FILE).read_text(encoding="utf-8")
    sources = _Sources()
    sources.feed(page)
    runs = [report] if report["kind"] == "evaluation" else [report["candidate"], report["baseline"]]
    utterances = sum(len(s["utterances"]) for s in runs[0]["speakers"].values())
    assert utterances == len(SPEAKERS)
    assert len(sources.audio) == utterances * (len(runs) + 1)
    # one picture per utterance and model, and the run's curves (OUTPUT_DIR holds the trained run's metrics.jsonl)
    assert sources.images.count(CURVES_FILE) == 1
    assert len(sources.images) == utterances * len(runs) + 1
    for src in sources.audio + sources.images:
        assert src and not Path(src).is_absolute() and (out / src).is_file(), src
    for src in sources.images:
        assert matplotlib.image.imread(out / src).shape[-1] in (3, 4)
    for src in sources.audio:
        assert sf.info(out / src).samplerate == SAMPLE_RATE
    first = runs[0]["speakers"]["english_speaker"]["utterances"][0]
    assert first["text"] in page and first["real_audio"] in sources.audio and first["audio"] in sources.audio


def test_checkpoints_load_in_the_training_dtype(trained):
    import dataclasses

    import torch

    settings, export = trained
    for precision, dtype in (("bf16", torch.bfloat16), ("no", torch.float32)):
        wrapper = load_model(export, dataclasses.replace(settings, MIXED_PRECISION=precision))
        assert {p.dtype for p in wrapper.model.talker.parameters()} == {dtype}
