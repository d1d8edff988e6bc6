import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
from conftest import VOICES_DIR, make_settings, speechlike, write_wav

from finetuning.constants import SAMPLES_PER_FRAME
from finetuning.preparation import schema
from finetuning.preparation.encoder import SpeechEncoder
from finetuning.preparation.prepare import PreparationError, assign_splits, prepare_dataset
from finetuning.settings import BUNDLED_SPEAKERS


def copy_voices(tmp_path):
    voices = tmp_path / "voices"
    shutil.copytree(VOICES_DIR, voices)
    return voices


def encoder_for(settings):
    return SpeechEncoder(settings.TOKENIZER_PATH, "cpu", settings.ENCODE_BATCH_SIZE)


@pytest.fixture(scope="module")
def bundled(tmp_path_factory, tiny_model_dir):
    """The bundled speakers prepared once for this module: (settings, reports)."""
    tmp_path = tmp_path_factory.mktemp("bundled")
    settings = make_settings(tmp_path, tiny_model_dir, VOICES_DIR=copy_voices(tmp_path))
    return settings, prepare_dataset(settings, encoder=encoder_for(settings), report=lambda _: None)


def test_one_config_per_speaker_in_card_and_loadable(bundled):
    settings, reports = bundled
    root = settings.DATASET_DIR
    text = (Path(root) / schema.CARD_FILE).read_text()
    for speaker in BUNDLED_SPEAKERS:
        assert f"config_name: {speaker}" in text
        fingerprint = next(r.fingerprint for r in reports if r.speaker == speaker)
        for split in ("train", "validation", "reference"):
            assert f"path: {speaker}/{split}-{fingerprint[:12]}-*.parquet" in text
    assert sorted(datasets.get_dataset_config_names(root)) == sorted(BUNDLED_SPEAKERS)
    for report in reports:
        train = datasets.load_dataset(root, name=report.speaker, split="train")
        assert len(train) == report.splits["train"] and set(train["speaker"]) == {report.speaker}
        row = train[0]
        codes = np.asarray(row["audio_codes"])
        assert codes.shape == (row["num_frames"], 16)
        assert row["audio"]["sampling_rate"] == 24000 and row["audio"]["array"].ndim == 1
        frames_for_audio = -(-len(row["audio"]["array"]) // SAMPLES_PER_FRAME)
        assert row["num_frames"] == frames_for_audio
        assert row["duration_s"] == pytest.approx(len(row["audio"]["array"]) / 24000, abs=1e-3)
        refs = datasets.load_dataset(root, name=report.speaker, split="reference")
        assert len(refs) == 1 and refs[0]["num_frames"] > 0


def test_streaming_matches_map_style(bundled):
    settings, _ = bundled
    speaker = BUNDLED_SPEAKERS[0]
    mapped = datasets.load_dataset(settings.DATASET_DIR, name=speaker, split="train")
    streamed = list(datasets.load_dataset(settings.DATASET_DIR, name=speaker, split="train", streaming=True))
    assert [r["id"] for r in streamed] == mapped["id"]
    assert streamed[0]["audio_codes"] == mapped[0]["audio_codes"]


def test_summary_json_counts_clips_and_hours(bundled):
    settings, reports = bundled
    summary = json.loads((Path(settings.DATASET_DIR) / schema.SUMMARY_FILE).read_text())
    for report in reports:
        entry = summary[report.speaker]
        assert entry["kept"] == report.kept == 14
        assert entry["rejected_total"] == 0
        assert 0 < entry["hours_kept"] < 0.05


def test_rerun_does_no_encoding(bundled, tiny_model_dir):
    settings, first = bundled
    encoder = encoder_for(settings)
    again = prepare_dataset(settings, encoder=encoder, report=lambda _: None)
    assert encoder.clips_encoded == 0 and encoder._tokenizer is None
    assert [r.prepared for r in again] == [False, False]
    assert [r.fingerprint for r in again] == [r.fingerprint for r in first]


def test_changed_speaker_is_redone_alone_and_new_speaker_leaves_others(tmp_path, tiny_model_dir):
    voices = copy_voices(tmp_path)
    settings = make_settings(tmp_path, tiny_model_dir, VOICES_DIR=voices, MAX_SHARD_SIZE_MB=0.05)
    prepare_dataset(settings, encoder=encoder_for(settings), max_samples=4, report=lambda _: None)
    english_dir = tmp_path / "dataset" / "english_speaker"
    stamp = {p.name: p.stat().st_mtime_ns for p in english_dir.iterdir()}
    metadata = voices / "swahili_speaker" / "metadata.jsonl"
    metadata.write_text(metadata.read_text().replace("Habari za asubuhi.", "Habari za jioni."))
    encoder = encoder_for(settings)
    reports = prepare_dataset(settings, encoder=encoder, max_samples=4, report=lambda _: None)
    assert {r.speaker: r.prepared for r in reports} == {"english_speaker": False, "swahili_speaker": True}
    assert encoder.clips_encoded == 4 + 1  # four clips and the reference of the changed speaker only
    assert {p.name: p.stat().st_mtime_ns for p in english_dir.iterdir()} == stamp
    # a third speaker added later
    shutil.copytree(voices / "english_speaker", voices / "third")
    shutil.copy(voices / "english_speaker.wav", voices / "third.wav")
    settings3 = make_settings(
        tmp_path, tiny_model_dir, VOICES_DIR=voices, MAX_SHARD_SIZE_MB=0.05, TRAIN_SPEAKERS="third"
    )
    prepare_dataset(settings3, encoder=encoder_for(settings3), max_samples=4, report=lambda _: None)
    assert {p.name: p.stat().st_mtime_ns for p in english_dir.iterdir()} == stamp
    card = (tmp_path / "dataset" / schema.CARD_FILE).read_text()
    assert all(f"config_name: {s}" in card for s in ("english_speaker", "swahili_speaker", "third"))
    # tiny shard bound: several shards, nothing lost
    assert len(list(english_dir.glob("train-*.parquet"))) > 1
    train = datasets.load_dataset(str(tmp_path / "dataset"), name="english_speaker", split="train")
    assert len(train) + 1 == 4  # 4 clips: 3 train + 1 validation


def test_reprepared_folder_never_loads_stale_rows(tmp_path, tiny_model_dir):
    voices = copy_voices(tmp_path)
    settings = make_settings(tmp_path, tiny_model_dir, VOICES_DIR=voices, TRAIN_SPEAKERS="english_speaker")
    rows = (voices / "english_speaker" / "metadata.jsonl").read_text().splitlines()
    stems = [Path(json.loads(line)["audio"]).stem for line in rows]

    def loaded_ids() -> list[str]:
        """Every prepared row's id as 🤗 datasets loads the folder (all splits but the reference clip's)."""
        splits = datasets.load_dataset(settings.DATASET_DIR, name="english_speaker")
        return sorted(i for name, split in splits.items() if name != schema.REFERENCE_SPLIT for i in split["id"])

    prepare_dataset(settings, encoder=encoder_for(settings), max_samples=3, report=lambda _: None)
    assert loaded_ids() == sorted(stems[:3])
    prepare_dataset(settings, encoder=encoder_for(settings), max_samples=6, report=lambda _: None)
    assert loaded_ids() == sorted(stems[:6])  # the new rows, each once, none of the first preparation's kept twice


def test_bad_clips_are_counted_not_fatal(tmp_path, tiny_model_dir):
    spk = tmp_path / "voices" / "spk"
    write_wav(tmp_path / "voices" / "spk.wav", speechlike(3.0, seed=9))
    good = [write_wav(spk / f"good{i}.wav", speechlike(2.0, seed=i)) for i in range(3)]
    (spk / "corrupt.wav").write_bytes(b"RIFF....garbage")
    write_wav(spk / "short.wav", speechlike(0.2))
    write_wav(spk / "long.wav", speechlike(8.0))
    write_wav(spk / "silent.wav", np.concatenate([speechlike(0.3), np.zeros(72000, "float32")]))
    write_wav(spk / "quiet.wav", speechlike(2.0, level=0.002))
    write_wav(spk / "clipped.wav", np.clip(speechlike(2.0, level=1.0) * 4, -1, 1))
    write_wav(spk / "fast.wav", speechlike(1.0))
    rows = [{"audio": p.name, "text": "a good clear sentence"} for p in good]
    rows += [
        {"audio": "missing.wav", "text": "a sentence"},
        {"audio": "corrupt.wav", "text": "a sentence"},
        {"audio": "good0.wav", "text": ""},
        {"audio": "short.wav", "text": "hi"},
        {"audio": "long.wav", "text": "a long sentence that goes on"},
        {"audio": "silent.wav", "text": "a sentence"},
        {"audio": "quiet.wav", "text": "a sentence"},
        {"audio": "clipped.wav", "text": "a sentence"},
        {"audio": "fast.wav", "text": "x" * 80},
    ]
    (spk / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    settings = make_settings(
        tmp_path, tiny_model_dir, VOICES_DIR=tmp_path / "voices", TRAIN_SPEAKERS="spk", MAX_DURATION_S=6
    )
    (report,) = prepare_dataset(settings, encoder=encoder_for(settings), report=lambda _: None)
    assert report.kept == 3
    assert report.rejected == {
        "missing_file": 1,
        "unreadable": 1,
        "empty_text": 1,
        "too_short": 1,
        "too_long": 1,
        "mostly_silence": 1,
        "too_quiet": 1,
        "clipping": 1,
        "implausible_chars_per_second": 1,
    }
    summary = json.loads((tmp_path / "dataset" / schema.SUMMARY_FILE).read_text())
    assert summary["spk"]["rejected_total"] == 9


def test_speaker_with_no_usable_clip_stops_naming_it(tmp_path, tiny_model_dir):
    spk = tmp_path / "voices" / "lonely"
    write_wav(tmp_path / "voices" / "lonely.wav", speechlike(3.0))
    (spk).mkdir(parents=True)
    (spk / "metadata.jsonl").write_text(json.dumps({"audio": "nothing.wav", "text": "hi there"}) + "\n")
    settings = make_settings(tmp_path, tiny_model_dir, VOICES_DIR=tmp_path / "voices", TRAIN_SPEAKERS="lonely")
    with pytest.raises(PreparationError, match="speaker lonely: no clip passed.*missing_file: 1"):
        prepare_dataset(settings, encoder=encoder_for(settings), report=lambda _: None)


def test_missing_reference_stops_naming_speaker_and_fix(tmp_path, tiny_model_dir):
    voices = copy_voices(tmp_path)
    (voices / "swahili_speaker.wav").unlink()
    settings = make_settings(tmp_path, tiny_model_dir, VOICES_DIR=voices, TRAIN_SPEAKERS="swahili_speaker")
    with pytest.raises(PreparationError, match=r"speaker swahili_speaker: no usable reference.*swahili_speaker\.wav"):
        prepare_dataset(settings, encoder=encoder_for(settings), report=lambda _: None)


def test_manifest_declares_other_sources(tmp_path, tiny_model_dir):
    lj = tmp_path / "lj"
    for i in range(3):
        write_wav(lj / "wavs" / f"c{i}.wav", speechlike(1.5, seed=i), sample_rate=22050)
    (lj / "metadata.csv").write_text("".join(f"c{i}|sentence number {i}\n" for i in range(3)))
    write_wav(tmp_path / "myref.wav", speechlike(3.0))
    manifest = tmp_path / "speakers.json"
    manifest.write_text(
        json.dumps({"lj": {"source": str(lj), "language": "english", "reference": [str(tmp_path / "myref.wav")]}})
    )
    settings = make_settings(tmp_path, tiny_model_dir, TRAIN_SPEAKERS="lj", SPEAKERS_MANIFEST=manifest)
    (report,) = prepare_dataset(settings, encoder=encoder_for(settings), report=lambda _: None)
    assert report.kept == 3
    rows = datasets.load_dataset(settings.DATASET_DIR, name="lj", split="train")
    assert set(rows["language"]) == {"english"}


def test_split_is_deterministic_and_order_free(tiny_model_dir, tmp_path):
    settings = make_settings(tmp_path, tiny_model_dir, VALIDATION_FRACTION=0.2, TEST_FRACTION=0.1)
    ids = [f"clip{i}" for i in range(20)]
    first = dict(zip(ids, assign_splits(ids, [None] * 20, settings, "spk"), strict=True))
    shuffled = ids[::-1]
    second = dict(zip(shuffled, assign_splits(shuffled, [None] * 20, settings, "spk"), strict=True))
    assert first == second
    assert sorted(first.values()).count("validation") == 4 and sorted(first.values()).count("test") == 2
    other_seed = make_settings(tmp_path, tiny_model_dir, VALIDATION_FRACTION=0.2, TEST_FRACTION=0.1, SEED=7)
    assert assign_splits(ids, [None] * 20, other_seed, "spk") != list(first.values())
    given = assign_splits(["a", "b"], ["validation", None], settings, "spk")
    assert given == ["validation", "train"]


def test_a_torn_info_file_or_a_staging_folder_is_never_taken_for_a_config(tmp_path, tiny_model_dir):
    """After a crash: a staging folder ``.X.tmp`` with its info file is not a config, a config whose
    prepare_info.json was cut short is prepared again (preparation) or named with the fix (training)."""
    from finetuning.preparation.writing import local_configs
    from finetuning.training.data import DataError, load_split

    settings = make_settings(tmp_path, tiny_model_dir, TRAIN_SPEAKERS="english_speaker", VALIDATION_FRACTION=0.0)
    prepare_dataset(settings, encoder=encoder_for(settings), max_samples=2, report=lambda _: None)
    dataset = tmp_path / "dataset"
    shutil.copytree(dataset / "english_speaker", dataset / ".english_speaker.tmp")
    assert list(local_configs(dataset)) == ["english_speaker"]
    info = dataset / "english_speaker" / schema.INFO_FILE
    info.write_text(info.read_text()[:20])  # cut short
    with pytest.raises(DataError, match=r"prepare_info.json is damaged.*data_preparation.py --speaker english_speaker"):
        load_split(settings, "english_speaker", "train")
    assert local_configs(dataset) == {}
    reports = prepare_dataset(settings, encoder=encoder_for(settings), max_samples=2, report=lambda _: None)
    assert reports[0].prepared and json.loads(info.read_text())["fingerprint"] == reports[0].fingerprint


def test_a_clip_that_exists_but_cannot_be_read_keeps_the_prepared_config(tmp_path, tiny_model_dir):
    """A read error (here a folder where the clip was: it exists and cannot be read) must not rebuild the config
    without that clip: the run stops for that speaker naming the file, the config stays byte-identical, and once
    the clip reads again nothing is prepared."""
    voices = copy_voices(tmp_path)
    settings = make_settings(tmp_path, tiny_model_dir, VOICES_DIR=voices, TRAIN_SPEAKERS="english_speaker")
    (first,) = prepare_dataset(settings, encoder=encoder_for(settings), max_samples=3, report=lambda _: None)
    config = tmp_path / "dataset" / "english_speaker"
    before = {p.name: p.read_bytes() for p in config.iterdir()}
    clip = voices / "english_speaker" / "clips" / "english_speaker_002.flac"
    clip.rename(tmp_path / "aside.flac")
    clip.mkdir()
    with pytest.raises(PreparationError, match="english_speaker_002.flac.*the prepared config is kept"):
        prepare_dataset(settings, encoder=encoder_for(settings), max_samples=3, report=lambda _: None)
    assert {p.name: p.read_bytes() for p in config.iterdir()} == before
    clip.rmdir()
    (tmp_path / "aside.flac").rename(clip)
    (again,) = prepare_dataset(settings, encoder=encoder_for(settings), max_samples=3, report=lambda _: None)
    assert not again.prepared and again.fingerprint == first.fingerprint
