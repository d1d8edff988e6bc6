"""The prepared dataset's contract: columns, splits, file layout and dataset card. Written in one place.

Layout of a prepared dataset (a local folder, or the same files in a Hub dataset repo)::

    README.md                               dataset card; its YAML ``configs:`` lists every speaker and split
    preparation_summary.json                per-speaker counts, hours and rejections of the last run
    <speaker>/train-<fp>-00000-of-0000N.parquet  one config per speaker, parquet shards of bounded size
    <speaker>/validation-*.parquet
    <speaker>/test-*.parquet                only when TEST_FRACTION > 0 or the source gives a test split
    <speaker>/reference-*.parquet           the speaker's reference clip(s), for speaker embeddings
    <speaker>/prepare_info.json             the config's fingerprint and summary; written last

Columns of every split (``FEATURES``):
    id           string                 unique within the speaker
    speaker      string                 the config name
    text         string                 transcript as given (stripped)
    language     string                 e.g. "english"; "auto" when unknown
    audio        Audio(24 kHz)          16-bit FLAC, mono
    duration_s   float32                seconds
    num_frames   int32                  codec frames (12.5 per second)
    audio_codes  list[list[int16]]      (num_frames, 16) 12 Hz speech-tokenizer codes, 0..2047
    instruct     string                 the clip's instruction (a style, or a voice description); "" = none
                                        (schema 2; datasets of schema 1 lack it and read as "")
"""

from __future__ import annotations

from finetuning.constants import NUM_CODEBOOKS, SAMPLE_RATE

SCHEMA_VERSION = 2  # 2: instruct column
DATA_SPLITS = ("train", "validation", "test")
REFERENCE_SPLIT = "reference"
ALL_SPLITS = (*DATA_SPLITS, REFERENCE_SPLIT)
INFO_FILE = "prepare_info.json"
SUMMARY_FILE = "preparation_summary.json"
CARD_FILE = "README.md"
UNKNOWN_LANGUAGE = "auto"
OPTIONAL_COLUMNS = ("instruct",)  # added after schema 1: a dataset without them reads them as empty


def features():
    """The ``datasets.Features`` of every split."""
    import datasets

    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "speaker": datasets.Value("string"),
            "text": datasets.Value("string"),
            "language": datasets.Value("string"),
            "audio": datasets.Audio(sampling_rate=SAMPLE_RATE),
            "duration_s": datasets.Value("float32"),
            "num_frames": datasets.Value("int32"),
            "audio_codes": datasets.Sequence(datasets.Sequence(datasets.Value("int16"), length=NUM_CODEBOOKS)),
            "instruct": datasets.Value("string"),
        }
    )


FINGERPRINT_CHARS = 12


def shard_name(split: str, fingerprint: str, index: int, count: int) -> str:
    """Shard file name. The config's fingerprint is part of it (and of the card's patterns) so that a re-prepared
    config never matches a cache entry of the old one: 🤗 datasets caches local folders by pattern."""
    return f"{split}-{fingerprint[:FINGERPRINT_CHARS]}-{index:05d}-of-{count:05d}.parquet"


def split_pattern(speaker: str, split: str, fingerprint: str) -> str:
    return f"{speaker}/{split}-{fingerprint[:FINGERPRINT_CHARS]}-*.parquet"


def render_card(infos: dict[str, dict]) -> str:
    """Dataset card text from each config's prepare_info (``{"fingerprint": ..., "summary": {...}}``)."""
    lines = ["---", "configs:"]
    summaries = {speaker: info.get("summary", {}) for speaker, info in infos.items()}
    configs = {
        speaker: [s for s in ALL_SPLITS if summary.get("splits", {}).get(s)] for speaker, summary in summaries.items()
    }
    for speaker in sorted(configs):
        lines += [f"- config_name: {speaker}", "  data_files:"]
        for split in configs[speaker]:
            lines += [
                f"  - split: {split}",
                f"    path: {split_pattern(speaker, split, infos[speaker]['fingerprint'])}",
            ]
    lines += ["tags:", "- text-to-speech", "- qwen3-tts", "---", ""]
    lines += [
        "# Multi-speaker Qwen3-TTS fine-tuning data",
        "",
        "One config per speaker. Audio is 24 kHz mono; `audio_codes` holds the 12 Hz speech-tokenizer codes",
        "(frames x 16), precomputed once. The `reference` split holds each speaker's reference clip(s).",
        "",
        "| speaker | train | validation | test | hours kept | rejected |",
        "|---|---|---|---|---|---|",
    ]
    for speaker in sorted(configs):
        summary = summaries.get(speaker, {})
        splits = summary.get("splits", {})
        lines.append(
            f"| {speaker} | {splits.get('train', 0)} | {splits.get('validation', 0)} | {splits.get('test', 0)} "
            f"| {summary.get('hours_kept', 0):.3f} | {summary.get('rejected_total', 0)} |"
        )
    lines += [
        "",
        "```python",
        "from datasets import load_dataset",
        f'ds = load_dataset("<this repo or folder>", name="{sorted(configs)[0] if configs else "speaker"}", '
        'split="train")',
        "```",
        "",
    ]
    return "\n".join(lines)
