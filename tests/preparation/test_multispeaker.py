import json
import logging

import datasets
import pytest
from conftest import VOICES_DIR, make_settings, speechlike, write_wav

from finetuning.preparation import schema
from finetuning.preparation.encoder import SpeechEncoder
from finetuning.preparation.multispeaker import cleanliness, pick_references, safe_config_name
from finetuning.preparation.prepare import PreparationError, prepare_dataset

CLIPS = sorted((VOICES_DIR / "english_speaker" / "clips").glob("*.flac"))
TEXTS = [json.loads(line)["text"] for line in (VOICES_DIR / "english_speaker" / "metadata.jsonl").open()]
# LibriTTS-like numbers, VCTK-like ids and a free-form name; "Lone Voice" has too few clips for min_clips.
SPEAKERS = {"1034": 3, "p225": 3, "Ann Lee": 3, "Lone Voice": 1}


def _corpus(tmp_path) -> tuple:
    rows, clip = [], 0
    for speaker, count in SPEAKERS.items():
        for _ in range(count):
            rows.append({"audio": str(CLIPS[clip]), "text": TEXTS[clip], "speaker": speaker, "language": "en"})
            clip += 1
    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    manifest = tmp_path / "speakers.json"
    entry = {"source": str(source), "speaker_column": "speaker", "min_clips": 2, "prefix": "corpus_"}
    entry["references"] = {"p225": [str(VOICES_DIR / "english_speaker.wav")]}
    manifest.write_text(json.dumps({"corpus": entry}))
    return source, manifest


def test_one_jsonl_with_many_speakers_gives_one_config_each(tmp_path, tiny_model_dir, caplog):
    _, manifest = _corpus(tmp_path)
    settings = make_settings(
        tmp_path, tiny_model_dir, TRAIN_SPEAKERS="corpus", SPEAKERS_MANIFEST=manifest, VALIDATION_FRACTION=0.0
    )
    printed = []
    with caplog.at_level(logging.WARNING):
        reports = prepare_dataset(
            settings, encoder=SpeechEncoder(settings.TOKENIZER_PATH, "cpu"), report=printed.append
        )
    names = ["corpus_1034", "corpus_ann_lee", "corpus_p225"]
    assert [r.speaker for r in reports] == names
    assert "'Lone Voice' left out: 1 clips" in caplog.text
    assert printed[0].split("TRAIN_SPEAKERS=")[1].split(",") == names  # exactly these: none left out, none added
    assert sorted(datasets.get_dataset_config_names(settings.DATASET_DIR)) == names
    for report in reports:
        train = datasets.load_dataset(settings.DATASET_DIR, name=report.speaker, split="train")
        assert len(train) == 3 and set(train["speaker"]) == {report.speaker} and set(train["language"]) == {"english"}
        refs = datasets.load_dataset(settings.DATASET_DIR, name=report.speaker, split=schema.REFERENCE_SPLIT)
        expected = ["reference-english_speaker"] if report.speaker == "corpus_p225" else None
        assert len(refs) == 1 and (expected is None or refs["id"] == expected)
    texts_of = {
        r.speaker: set(datasets.load_dataset(settings.DATASET_DIR, name=r.speaker, split="train")["text"])
        for r in reports
    }
    assert texts_of["corpus_1034"] == set(TEXTS[:3]) and texts_of["corpus_p225"] == set(TEXTS[3:6])


def test_auto_reference_is_the_cleanest_long_enough_clip():
    speech = speechlike(4.0, seed=1)
    gappy = speechlike(4.0, seed=2)
    gappy[: len(gappy) // 2] = 0.0  # half silence
    short = speechlike(1.0, seed=3)
    assert pick_references([cleanliness(clip) for clip in (gappy, short, speech)]) == [2]
    assert pick_references([cleanliness(short)]) == [0]  # no long clip: the best of what there is


def test_safe_config_names():
    assert safe_config_name("libri_", "1034") == "libri_1034"
    assert safe_config_name("", "Ann Lee / take 2") == "ann_lee_take_2"


def test_two_values_with_one_safe_name_are_refused(tmp_path, tiny_model_dir):
    write_wav(tmp_path / "a.wav", speechlike(1.0))
    rows = [{"audio": "a.wav", "text": "hello there", "speaker": name} for name in ("Ann Lee", "ann-lee", "ann_lee")]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "m.json").write_text(
        json.dumps({"g": {"source": str(tmp_path / "c.jsonl"), "speaker_column": "speaker"}})
    )
    settings = make_settings(tmp_path, tiny_model_dir, TRAIN_SPEAKERS="g", SPEAKERS_MANIFEST=tmp_path / "m.json")
    with pytest.raises(PreparationError, match="'Ann Lee' and 'ann_lee' both become config 'g_ann_lee'"):
        prepare_dataset(settings, encoder=SpeechEncoder(settings.TOKENIZER_PATH, "cpu"), report=lambda _: None)


def test_min_minutes_filter_and_single_speaker_warning(tmp_path, tiny_model_dir, caplog):
    from finetuning.preparation.multispeaker import expand_group, group_from_entry

    source, _ = _corpus(tmp_path)
    entry = {"source": str(source), "speaker_column": "speaker", "min_minutes": 0.05}  # 3 s of audio
    planned, skipped = expand_group(group_from_entry("c", entry))
    assert [spec.name for spec, _ in planned] == ["c_1034", "c_ann_lee", "c_p225"]  # about 5 s each
    assert list(skipped) == ["Lone Voice"] and "min_minutes 0.05" in skipped["Lone Voice"]
    assert all(spec.auto_references for spec, _ in planned)
    manifest = tmp_path / "one.json"
    manifest.write_text(json.dumps({"everyone": {"source": str(source), "reference": [str(CLIPS[0])]}}))
    settings = make_settings(tmp_path, tiny_model_dir, TRAIN_SPEAKERS="everyone", SPEAKERS_MANIFEST=manifest)
    with caplog.at_level(logging.WARNING):
        prepare_dataset(settings, encoder=SpeechEncoder(settings.TOKENIZER_PATH, "cpu"), max_samples=1)
    assert "its source names 4 speakers" in caplog.text and "speaker_column" in caplog.text
