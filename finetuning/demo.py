"""The whole pipeline, offline, on the bundled speakers with a tiny random model: ``uv run python finetuning/demo.py``.

Builds a tiny Base model, prepares the bundled speakers, fine-tunes on both, exports a custom-voice checkpoint
and speaks one sentence per speaker through stock ``generate_custom_voice``. Nothing is downloaded: the Base
model is a tiny, randomly initialised Qwen3-TTS of the real architecture (``finetuning/tiny_model.py``) with a
random speech codec, so the audio it produces is noise-like by design; the pipeline and the files are real.
The demo ignores your ``.env`` so that it always runs the same way; pass ``--output_dir`` to put files elsewhere.

``--recordings`` starts from long recordings instead of clips: each bundled speaker's sentences are joined, with
pauses, into one session file with one sentence of the other voice in the middle (an interviewer) and an
``.srt`` of every sentence; preparation cuts the sessions at the subtitles, drops the other voice with the
speaker filter and writes the same two configs.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

from finetuning.constants import SAMPLE_RATE  # noqa: E402
from finetuning.evaluation.speech import load_checkpoint, synthesize  # noqa: E402
from finetuning.preparation.audio import load_mono_24k  # noqa: E402
from finetuning.preparation.prepare import prepare_dataset  # noqa: E402
from finetuning.settings import BUNDLED_SPEAKERS, load_settings  # noqa: E402
from finetuning.tiny_model import build_tiny_model  # noqa: E402
from finetuning.training.data import load_split  # noqa: E402
from finetuning.training.loop import train  # noqa: E402

DEMO_STEPS = 400
SESSION_PAUSES_S = (0.6, 0.9, 0.7, 1.2)  # pauses between the sentences of a demo session, in turn

REPO_ROOT = Path(__file__).resolve().parents[1]


def _srt_time(seconds: float) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def write_demo_recordings(folder: Path, voices: Path, speakers=BUNDLED_SPEAKERS) -> Path:
    """One session per speaker under ``folder/<speaker>/session.wav`` with its ``session.srt``: the speaker's
    bundled sentences joined with SESSION_PAUSES_S, and the next speaker's first sentence in the middle. Returns
    the SPEAKERS_MANIFEST (format ``recordings``) naming them."""
    corpora = {
        name: [json.loads(line) for line in (voices / name / "metadata.jsonl").read_text().splitlines()]
        for name in speakers
    }
    manifest = {}
    for number, name in enumerate(speakers):
        rows = [(name, row) for row in corpora[name]]
        other = speakers[(number + 1) % len(speakers)]
        rows.insert(len(rows) // 2, (other, corpora[other][0]))
        pieces, cues, position = [], [], 0
        for index, (owner, row) in enumerate(rows):
            clip = load_mono_24k(voices / owner / row["audio"])
            cues.append(f"{index + 1}\n{_srt_time(position / SAMPLE_RATE)} --> ")
            cues[-1] += f"{_srt_time((position + len(clip)) / SAMPLE_RATE)}\n{row['text']}\n"
            pause = np.zeros(round(SESSION_PAUSES_S[index % len(SESSION_PAUSES_S)] * SAMPLE_RATE), np.float32)
            pieces += [clip, pause]
            position += len(clip) + len(pause)
        session = folder / name / "session.wav"
        session.parent.mkdir(parents=True, exist_ok=True)
        sf.write(session, np.concatenate(pieces), SAMPLE_RATE)
        session.with_suffix(".srt").write_text("\n".join(cues), encoding="utf-8")
        language = corpora[name][0].get("language", "auto")
        reference = str(voices / f"{name}.wav")
        manifest[name] = {"source": str(session.parent), "format": "recordings", "language": language}
        manifest[name]["reference"] = [reference]
    path = folder / "speakers.json"
    path.write_text(json.dumps(manifest, indent=2))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo", help="where the demo writes (default: outputs/demo)")
    parser.add_argument("--layout", default="equal", choices=("equal", "wide_text"), help="tiny model layout")
    parser.add_argument("--max_steps", type=int, default=DEMO_STEPS, help=f"optimizer steps (default {DEMO_STEPS})")
    parser.add_argument("--recordings", action="store_true", help="start from long recordings with subtitles")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    out = Path(args.output_dir)

    voices = REPO_ROOT / "voices"
    print("[1/4] building a tiny random Qwen3-TTS Base model (offline) ...")
    base = build_tiny_model(out / "tiny_base", layout=args.layout, seed=0)
    settings = load_settings(
        None,
        environ={},
        overrides={
            "TRAIN_SPEAKERS": ",".join(BUNDLED_SPEAKERS),
            "VOICES_DIR": str(voices),
            "DATASET_DIR": str(out / "dataset"),
            "INIT_MODEL_PATH": str(base),
            "TOKENIZER_PATH": str(base / "speech_tokenizer"),
            "OUTPUT_DIR": str(out / "run"),
            "DEVICE": "cpu",
            "MIXED_PRECISION": "no",
            "MAX_BATCH_TOKENS": 0,
            "BATCH_SIZE": 8,
            "DATALOADER_WORKERS": 0,
            "GRADIENT_ACCUMULATION_STEPS": 1,
            "LEARNING_RATE": 3e-3,
            "LR_SCHEDULE": "constant",
            "WARMUP_STEPS": 0,
            "MAX_STEPS": args.max_steps,
            "LOGGING_STEPS": 25,
            "EVAL_STEPS": 50,
            "SAVE_STEPS": 0,  # a demo run is short: nothing to resume
            "SPEAKERS_MANIFEST": str(write_demo_recordings(out / "recordings", voices)) if args.recordings else "",
            "ASR_MODEL": "",  # offline: the demo sessions carry subtitles
        },
    )
    print(f"      model: {base}")

    if args.recordings:
        print(f"[2/4] cutting the sessions in {out / 'recordings'} into clips, then preparing them ...")
    else:
        print("[2/4] preparing the bundled speakers (quality gate, 24 kHz, codes) ...")
    prepare_dataset(settings)
    print(f"      dataset: {Path(settings.DATASET_DIR).resolve()} (summary: preparation_summary.json)")

    print(f"[3/4] fine-tuning both speakers for {settings.MAX_STEPS} steps and exporting ...")
    result = train(settings)
    print(f"      train loss {result.train_loss:.3f}, validation codec-0 loss {result.eval_loss:.3f}")
    print(f"      checkpoint: {result.export_dir.resolve()} (metrics: {Path(settings.OUTPUT_DIR) / 'metrics.jsonl'})")

    print("[4/4] speaking one training sentence per speaker with stock generate_custom_voice ...")
    model = load_checkpoint(result.export_dir, device="cpu")
    samples = out / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    for speaker in settings.TRAIN_SPEAKERS:
        text = load_split(settings, speaker, "train", ["text"])[0]["text"]
        wav, sample_rate = synthesize(model, speaker, text, greedy=True, max_new_tokens=100)
        path = samples / f"{speaker}.wav"
        sf.write(path, wav, sample_rate)
        print(f"      {path.resolve()}: {wav.size / sample_rate:.2f} s, {text!r}")
    print("Done. Real use: put your keys in .env, then run data_preparation.py and finetune.py (see README).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
