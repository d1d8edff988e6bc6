"""The whole pipeline, offline, on the bundled speakers with a tiny random model: ``uv run python finetuning/demo.py``.

Nothing is downloaded: the Base model is a tiny, randomly initialised Qwen3-TTS of the real architecture
(``finetuning/tiny_model.py``), so the speech it would produce is noise-like by design. The demo ignores your
``.env`` so that it always runs the same way; pass ``--output_dir`` to put its files elsewhere.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import logging  # noqa: E402

from finetuning.prepare import prepare_dataset  # noqa: E402
from finetuning.settings import BUNDLED_SPEAKERS, load_settings  # noqa: E402
from finetuning.tiny_model import build_tiny_model  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo", help="where the demo writes (default: outputs/demo)")
    parser.add_argument("--layout", default="equal", choices=("equal", "wide_text"), help="tiny model layout")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    out = Path(args.output_dir)

    print("[1/2] building a tiny random Qwen3-TTS Base model (offline) ...")
    base = build_tiny_model(out / "tiny_base", layout=args.layout, seed=0)
    settings = load_settings(
        None,
        environ={},
        overrides={
            "TRAIN_SPEAKERS": ",".join(BUNDLED_SPEAKERS),
            "VOICES_DIR": str(REPO_ROOT / "voices"),
            "DATASET_DIR": str(out / "dataset"),
            "INIT_MODEL_PATH": str(base),
            "TOKENIZER_PATH": str(base / "speech_tokenizer"),
            "OUTPUT_DIR": str(out / "run"),
            "DEVICE": "cpu",
            "MIXED_PRECISION": "no",
        },
    )
    print(f"      model: {base}")

    print("[2/2] preparing the bundled speakers (quality gate, 24 kHz, codes) ...")
    prepare_dataset(settings)
    print(f"      dataset: {Path(settings.DATASET_DIR).resolve()} (summary: preparation_summary.json)")
    print("Training, export and evaluation are not part of this version yet; the demo stops here.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
