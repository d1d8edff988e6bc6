"""A preparation killed inside a speaker resumes where it stopped and writes what an uninterrupted run writes."""

import hashlib
from pathlib import Path

from conftest import make_settings, run_killed

from finetuning import atomic
from finetuning.preparation import clip_cache, schema
from finetuning.preparation.encoder import SpeechEncoder
from finetuning.preparation.prepare import prepare_dataset

SPEAKER = "english_speaker"
CLIPS = 4  # two encode batches of two


def _settings(root: Path, tiny_model_dir: Path):
    return make_settings(root, tiny_model_dir, TRAIN_SPEAKERS=SPEAKER, ENCODE_BATCH_SIZE=2)


def _prepare(settings) -> SpeechEncoder:
    encoder = SpeechEncoder(settings.TOKENIZER_PATH, "cpu", settings.ENCODE_BATCH_SIZE)
    prepare_dataset(settings, encoder=encoder, max_samples=CLIPS, report=lambda _: None)
    return encoder


def _files(dataset: Path) -> dict[str, str]:
    """Every file of the speaker's config with its content hash (prepare_info.json included)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((dataset / SPEAKER).iterdir())}


def test_killed_mid_speaker_resumes_from_stored_batches(tmp_path, tiny_model_dir):
    straight = _settings(tmp_path / "straight", tiny_model_dir)
    _prepare(straight)
    killed = _settings(tmp_path / "killed", tiny_model_dir)
    assert run_killed(lambda: _prepare(killed), [(clip_cache.ClipCache, "store")], kill_at=2) == (True, ["store"] * 2)
    dataset = Path(killed.DATASET_DIR)
    assert len(list((dataset / clip_cache.CACHE_DIR / SPEAKER).glob("*.npz"))) == 1
    assert not (dataset / SPEAKER).exists()
    encoder = _prepare(killed)
    assert encoder.clips_encoded == 2 + 1  # the second batch and the reference clip; the first came from disk
    assert _files(dataset) == _files(Path(straight.DATASET_DIR))
    assert not (dataset / clip_cache.CACHE_DIR / SPEAKER).exists()  # removed once the config is in place


def test_finished_staging_folder_is_put_in_place_without_encoding(tmp_path, tiny_model_dir):
    settings = _settings(tmp_path, tiny_model_dir)
    assert run_killed(lambda: _prepare(settings), [(atomic, "replace_folder")], kill_at=1) == (True, ["replace_folder"])
    dataset = Path(settings.DATASET_DIR)
    assert (dataset / f".{SPEAKER}.tmp" / schema.INFO_FILE).exists() and not (dataset / SPEAKER).exists()
    encoder = _prepare(settings)
    assert encoder.clips_encoded == 0 and encoder._tokenizer is None
    assert (dataset / SPEAKER / schema.INFO_FILE).exists() and not (dataset / f".{SPEAKER}.tmp").exists()
    assert f"config_name: {SPEAKER}" in (dataset / schema.CARD_FILE).read_text()
