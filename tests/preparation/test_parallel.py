import shutil
from pathlib import Path

import pyarrow.parquet as pq
from conftest import VOICES_DIR, make_settings

from finetuning.preparation.encoder import SpeechEncoder
from finetuning.preparation.prepare import prepare_dataset

CLIPS_PER_SPEAKER = 4


def _prepare(tmp_path: Path, tiny_model_dir: Path, workers: int):
    voices = tmp_path / "voices"
    if not voices.exists():
        shutil.copytree(VOICES_DIR, voices)
    settings = make_settings(
        tmp_path / f"workers{workers}",
        tiny_model_dir,
        VOICES_DIR=voices,
        PREPARATION_WORKERS=workers,
        ENCODE_BATCH_SIZE=2,  # several batches per speaker, spread over the workers
        NORMALIZE_LOUDNESS="true",
    )
    encoder = SpeechEncoder(settings.TOKENIZER_PATH, "cpu", settings.ENCODE_BATCH_SIZE)
    reports = prepare_dataset(settings, encoder=encoder, max_samples=CLIPS_PER_SPEAKER, report=lambda _: None)
    return Path(settings.DATASET_DIR), reports, encoder


def _tables(root: Path) -> dict[str, list]:
    return {str(p.relative_to(root)): pq.read_table(p).to_pylist() for p in sorted(root.rglob("*.parquet"))}


def test_two_worker_processes_write_what_one_process_writes(tmp_path, tiny_model_dir):
    one_root, one, _ = _prepare(tmp_path, tiny_model_dir, 1)
    two_root, two, main_encoder = _prepare(tmp_path, tiny_model_dir, 2)
    assert main_encoder.clips_encoded == len(two)  # only the reference clips: the rest went to the workers
    assert [r.fingerprint for r in one] == [r.fingerprint for r in two]
    assert [r.as_dict() for r in one] == [r.as_dict() for r in two]
    one_tables, two_tables = _tables(one_root), _tables(two_root)
    assert list(one_tables) == list(two_tables) and len(one_tables) >= 6
    for name, rows in one_tables.items():
        assert rows == two_tables[name], name  # ids, texts, FLAC bytes and codes, row for row
    assert sum(r.kept for r in two) == 2 * CLIPS_PER_SPEAKER
