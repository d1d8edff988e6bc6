"""Evaluation of checkpoints trained with instructions: each held-out row spoken with its own instruction.

Two short fine-tunes of the tiny model on the bundled English voice: custom voice with a style instruction on some
clips, and voice design (a description on every clip). The tests check what the runner promises: which stock call
speaks each row and with which instruction (the wrapper's own method, watched, never replaced), the means grouped
per instruction (exact keys and counts), and, custom voice only, the same rows generated again without their
instruction with the prosody difference between the two clips, recomputed from the files it wrote.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest
import soundfile as sf
import torch
from conftest import VOICES_DIR, make_settings

from finetuning.constants import SAMPLE_RATE
from finetuning.evaluation.grouping import INSTRUCT_EFFECT
from finetuning.evaluation.listening import HTML_FILE
from finetuning.evaluation.metrics import GROUP_METRICS, analyse_clip, prosody_difference
from finetuning.evaluation.report import render_markdown, write_report
from finetuning.evaluation.runner import evaluate_model
from finetuning.evaluation.scorers import load_scorers
from finetuning.evaluation.speech import load_model
from finetuning.evaluation.targets import load_targets
from finetuning.training.data import load_split

pytestmark = pytest.mark.slow  # each fixture prepares and briefly trains a tiny model

SPEAKER = "english_speaker"
ANGRY, WHISPER = "Speak in an angry tone.", "Whisper softly."
DEEP, BRIGHT = "A deep, slow male voice.", "A bright, fast female voice."
CLIPS = 6
MAX_SECONDS = 0.8  # 10 frames


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _voices(root, instructs):
    """The bundled English speaker's first clips, clip i under ``instructs[i]`` ("" = none)."""
    out = root / SPEAKER
    (out / "clips").mkdir(parents=True)
    lines = (VOICES_DIR / SPEAKER / "metadata.jsonl").read_text().splitlines()[: len(instructs)]
    rows = []
    for line, instruct in zip(lines, instructs, strict=True):
        row = json.loads(line)
        shutil.copy(VOICES_DIR / SPEAKER / row["audio"], out / row["audio"])
        rows.append({**row, "instruct": instruct})
    (out / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    shutil.copy(VOICES_DIR / f"{SPEAKER}.wav", root / f"{SPEAKER}.wav")
    return root


def _run(tmp_path, model_dir, instructs, **extra):
    """(settings, export) of a 4-step fine-tune on ``instructs``' clips, half of them held out."""
    from finetuning.preparation.prepare import prepare_dataset
    from finetuning.training.loop import train

    settings = make_settings(
        tmp_path,
        model_dir,
        VOICES_DIR=_voices(tmp_path / "voices", instructs),
        TRAIN_SPEAKERS=SPEAKER,
        VALIDATION_FRACTION=0.5,
        BATCH_SIZE=2,
        MAX_BATCH_TOKENS=0,
        LEARNING_RATE=3e-3,
        WARMUP_STEPS=0,
        MAX_STEPS=4,
        EVAL_STEPS=0,
        EVAL_MAX_SECONDS=MAX_SECONDS,
        EVAL_MAX_UTTERANCES=CLIPS,
        SPEAKER_SIM_BACKEND="resemblyzer",
        ASR_BACKEND="pocketsphinx",
        NATURALNESS_BACKEND="none",
        **extra,
    )
    prepare_dataset(settings, report=lambda _: None)
    return settings, train(settings).export_dir


def _evaluate(settings, export, output_dir, watched):
    """Evaluate ``export`` with its wrapper's ``watched`` method recording each call's ``instruct`` (the call
    itself goes through); returns (report, instructs passed in call order, held-out rows)."""
    wrapper = load_model(export, settings)
    calls, stock = [], getattr(wrapper, watched)

    def watch(**kwargs):
        calls.append(kwargs.get("instruct"))
        return stock(**kwargs)

    setattr(wrapper, watched, watch)
    scorers = load_scorers(settings)
    targets = load_targets(settings, [SPEAKER], scorers)
    report = evaluate_model(wrapper, settings, targets, scorers, export, output_dir)
    write_report(report, output_dir, settings)
    rows = list(load_split(settings, SPEAKER, "validation", ["id", "instruct"]))
    return report, calls, rows, (settings, export)


@pytest.fixture(scope="module")
def instructed(tiny_model_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("eval-instruct")
    settings, export = _run(tmp_path, tiny_model_dir, [ANGRY, "", WHISPER, ANGRY, "", WHISPER])
    return _evaluate(settings, export, tmp_path / "evaluation", "generate_custom_voice")


@pytest.fixture(scope="module")
def designed(tiny_model_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("eval-design")
    settings, export = _run(tmp_path, tiny_model_dir, [DEEP, BRIGHT] * 3, TRAINING_MODE="voice_design")
    return _evaluate(settings, export, tmp_path / "evaluation", "generate_voice_design")


def test_each_row_is_spoken_with_its_instruction_and_grouped_per_instruction(instructed):
    report, calls, rows, _ = instructed
    assert report["checkpoint"]["trained_instruct"] == [False, True]
    instructs = [row["instruct"] for row in rows]
    assert "" in instructs and any(instructs), instructs  # the held-out half has rows with and without one
    # each row with its instruction (None = left out), then, for a row with one, the same row without it
    assert calls == [call for i in instructs for call in ([i, None] if i else [None])]
    utterances = report["speakers"][SPEAKER]["utterances"]
    assert [u["instruct"] for u in utterances] == instructs
    assert "instruct=<row>" in report["speakers"][SPEAKER]["conditioning"]
    groups = report["instructions"]
    assert {key: group["utterances"] for key, group in groups.items()} == dict(Counter(instructs))
    for key, group in groups.items():
        assert group["speakers"] == {SPEAKER: instructs.count(key)}
        mean = group["means"]["perplexity_codec0"]
        assert (mean["n"], mean["of"]) == (instructs.count(key), instructs.count(key))
        scored = [u["values"]["perplexity_codec0"] for u in utterances if u["instruct"] == key]
        if len(scored) == 1:
            assert mean["value"] == pytest.approx(scored[0])
    assert "instruct_effect" not in groups[""]  # nothing to leave out


def test_perplexity_is_conditioned_on_the_rows_instruction(instructed):
    """Recomputed through ``held_out_perplexity`` with the row's instruction segment: the reported value; without
    it, another one (the segment shifts every later position)."""
    import numpy as np

    from finetuning.evaluation.speech import generation_language, speaking_layout
    from finetuning.evaluation.targets import held_out_perplexity
    from finetuning.training.export import read_info
    from finetuning.training.layout import instruct_text
    from finetuning.training.step import assistant_text

    report, _, _, (settings, export) = instructed
    model = load_model(export, settings)
    tokenizer, inner = model.processor.tokenizer, model.model
    layout = speaking_layout(read_info(export)["training_layout"], "custom_voice")
    embed = inner.talker.get_input_embeddings().weight[inner.config.talker_config.spk_id[SPEAKER]].detach()
    rows = {row["id"]: row for row in load_split(settings, SPEAKER, "validation", ["id", "text", "audio_codes"])}
    instructed_rows = [u for u in report["speakers"][SPEAKER]["utterances"] if u["instruct"]]
    assert instructed_rows
    for utterance in instructed_rows:
        row = rows[utterance["id"]]
        text_ids = tokenizer(assistant_text(row["text"]), return_tensors="pt")["input_ids"][0]
        instruct_ids = tokenizer(instruct_text(utterance["instruct"]), return_tensors="pt")["input_ids"][0]
        codes = np.asarray(row["audio_codes"], dtype=np.int64)
        language = generation_language(inner, "english")
        assert utterance["generation_language"] == language
        with_it, _ = held_out_perplexity(inner, text_ids, codes, embed, language, layout, instruct_ids)
        without, _ = held_out_perplexity(inner, text_ids, codes, embed, language, layout)
        assert utterance["values"]["perplexity_codec0"] == pytest.approx(with_it["perplexity_codec0"], rel=1e-5)
        assert without["perplexity_codec0"] != pytest.approx(with_it["perplexity_codec0"], rel=1e-5)


def test_the_instruction_effect_is_the_prosody_difference_of_with_and_without(instructed):
    report, _, rows, _ = instructed
    output_dir = report["output_dir"]
    effects = []
    for utterance in report["speakers"][SPEAKER]["utterances"]:
        effect = utterance.get("instruct_effect")
        assert (effect is not None) == bool(utterance["instruct"])
        if effect is None:
            continue
        with_wav, _ = sf.read(f"{output_dir}/{utterance['audio']}", dtype="float32")
        without, _ = sf.read(f"{output_dir}/{effect['audio_without']}", dtype="float32")
        assert "without_instruct" in effect["audio_without"]
        assert effect["identical"] == (with_wav.shape == without.shape and bool((with_wav == without).all()))
        expected = prosody_difference(analyse_clip(with_wav, SAMPLE_RATE), analyse_clip(without, SAMPLE_RATE))
        assert set(effect["values"]) == set(GROUP_METRICS["prosody"])
        for metric, value in expected.items():  # the files hold 16-bit samples: recomputed to a small tolerance
            if math.isfinite(value):
                assert effect["values"][metric] == pytest.approx(value, abs=0.05), metric
            else:
                assert effect["values"][metric] is None and metric in effect["errors"]
        effects.append((utterance["instruct"], effect))
    # what the prosody metrics give for two equal clips: the instruction changed nothing
    neutral = {"f0_median_diff_st": 0, "f0_range_diff_st": 0, "energy_corr": 1, "syllable_rate_ratio": 1}
    neutral |= {"duration_ratio": 1, "pause_fraction_diff": 0}
    for _, effect in effects:
        moved = [m for m, v in neutral.items() if effect["values"][m] is not None and effect["values"][m] != v]
        assert bool(moved) == (not effect["identical"]), effect
    assert any(not effect["identical"] for _, effect in effects), "the instruction changed no clip"
    groups = report["instructions"]
    for instruct in {instruct for instruct, _ in effects}:
        summary = groups[instruct]["instruct_effect"]
        mine = [effect for key, effect in effects if key == instruct]
        assert summary["pairs"] == len(mine) and summary["identical"] == sum(e["identical"] for e in mine)
        assert summary["compared"] == INSTRUCT_EFFECT and summary["scorer"] == report["scorers"]["prosody"]["backend"]
        values = [e["values"]["duration_ratio"] for e in mine if e["values"]["duration_ratio"] is not None]
        if values:
            assert summary["means"]["duration_ratio"]["value"] == pytest.approx(sum(values) / len(values))
    markdown = render_markdown(report)
    assert "## Per instruction" in markdown and "| (none) |" in markdown
    assert all(f"| {instruct} |" in markdown for instruct, _ in effects)
    page = (Path(output_dir) / HTML_FILE).read_text(encoding="utf-8")
    assert "Per instruction" in page and "without the instruction" in page


def test_voice_design_export_is_evaluated_through_generate_voice_design(designed):
    report, calls, rows, _ = designed
    assert report["checkpoint"]["model_type"] == "voice_design"
    assert report["checkpoint"]["trained_instruct"] == [True]
    section = report["speakers"][SPEAKER]
    assert "generate_voice_design" in section["conditioning"]
    descriptions = [row["instruct"] for row in rows]
    assert calls == descriptions  # one call per row, with its description; no voice without one
    assert [u["instruct"] for u in section["utterances"]] == descriptions
    assert all("instruct_effect" not in u for u in section["utterances"])
    assert all(u["values"]["perplexity_codec0"] >= 1.0 for u in section["utterances"])
    groups = report["instructions"]
    assert {key: group["utterances"] for key, group in groups.items()} == dict(Counter(descriptions))
    assert set(groups) <= {DEEP, BRIGHT} and all("instruct_effect" not in g for g in groups.values())
