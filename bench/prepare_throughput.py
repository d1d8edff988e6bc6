"""Data-preparation throughput with 1 and 2 processes on CPU, tiny speech tokenizer; prints JSON.

    uv run python bench/prepare_throughput.py [--copies 4]

The bundled corpus is replicated ``--copies`` times (one jsonl per speaker, distinct ids, same audio) and
prepared from scratch with PREPARATION_WORKERS=1, then 2. Reported per run: audio seconds prepared per wall
second (decode, gate, resample, encode, write). Worker processes are started, and their tokenizer and audio
libraries loaded, before the clock starts (``ClipProcessor.wait_until_ready`` and a warm-up run), as in the
single process. The two outputs are compared row
for row (``identical_output``), and a no-op re-run is timed relative to the cold single-process run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from finetuning.preparation.clips import ClipProcessor  # noqa: E402
from finetuning.preparation.encoder import SpeechEncoder  # noqa: E402
from finetuning.preparation.prepare import prepare_dataset  # noqa: E402
from finetuning.settings import BUNDLED_SPEAKERS, load_settings  # noqa: E402
from finetuning.tiny_model import build_tiny_model  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER_COUNTS = (1, 2)


def replicate_corpus(folder: Path, copies: int) -> Path:
    """A manifest whose speakers read the bundled corpus ``copies`` times over (ids made distinct)."""
    manifest = {}
    for speaker in BUNDLED_SPEAKERS:
        source = REPO_ROOT / "voices" / speaker / "metadata.jsonl"
        lines = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
        rows = [
            {**row, "audio": str(source.parent / row["audio"]), "id": f"{copy}-{index}"}
            for copy in range(copies)
            for index, row in enumerate(lines)
        ]
        corpus = folder / f"{speaker}.jsonl"
        corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
        manifest[speaker] = {"source": str(corpus), "reference": [str(REPO_ROOT / "voices" / f"{speaker}.wav")]}
    path = folder / "speakers.json"
    path.write_text(json.dumps(manifest))
    return path


def tables(root: Path) -> dict[str, list]:
    return {str(p.relative_to(root)): pq.read_table(p).to_pylist() for p in sorted(root.rglob("*.parquet"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=4, help="times the bundled corpus is replicated")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs, outputs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "tiny", seed=0)
        manifest = replicate_corpus(root, args.copies)
        for workers in WORKER_COUNTS:
            settings = load_settings(
                None,
                environ={},
                overrides={
                    "SPEAKERS_MANIFEST": str(manifest),
                    "DATASET_DIR": str(root / f"dataset{workers}"),
                    "TOKENIZER_PATH": str(model / "speech_tokenizer"),
                    "INIT_MODEL_PATH": str(model),
                    "DEVICE": "cpu",
                    "PREPARATION_WORKERS": workers,
                },
            )
            encoder = SpeechEncoder(settings.TOKENIZER_PATH, "cpu", settings.ENCODE_BATCH_SIZE)
            processor = ClipProcessor(encoder, workers)
            warm = load_settings(None, environ={}, overrides={**settings.public_dict(), "DATASET_DIR": str(root / "w")})
            processor.wait_until_ready()
            prepare_dataset(warm, max_samples=2, report=lambda _: None, processor=processor, encoder=encoder)
            start = time.perf_counter()
            reports = prepare_dataset(settings, report=lambda _: None, processor=processor, encoder=encoder)
            cold_s = time.perf_counter() - start
            processor.close()
            audio_s = sum(r.hours_kept for r in reports) * 3600.0
            run = {"processes": workers, "clips": sum(r.kept for r in reports), "audio_seconds": round(audio_s, 2)}
            run.update({"wall_s": round(cold_s, 3), "audio_seconds_per_wall_second": round(audio_s / cold_s, 2)})
            if workers == 1:
                start = time.perf_counter()
                prepare_dataset(settings, report=lambda _: None, processor=processor, encoder=encoder)
                run["noop_rerun_relative_to_first"] = round((time.perf_counter() - start) / cold_s, 4)
            runs.append(run)
            outputs[workers] = (tables(Path(settings.DATASET_DIR)), [r.fingerprint for r in reports])
    identical = all(outputs[w] == outputs[WORKER_COUNTS[0]] for w in WORKER_COUNTS)
    speedup = runs[-1]["audio_seconds_per_wall_second"] / runs[0]["audio_seconds_per_wall_second"]
    result = {
        "benchmark": "prepare_throughput",
        "device": "cpu",
        "cpu_count": os.cpu_count(),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "copies_of_bundled_corpus": args.copies,
        "runs": runs,
        "speedup_2_vs_1": round(speedup, 2),
        "identical_output": identical,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
