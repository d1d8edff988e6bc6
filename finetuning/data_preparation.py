"""Prepare speaker data once: ``uv run python finetuning/data_preparation.py [--speaker all] [--upload --repo_id R]``.

Reads each speaker's source, applies the quality gate, resamples to 24 kHz mono, precomputes speech-tokenizer
codes and writes one dataset config per speaker to DATASET_DIR (or ``--output_dir``). ``--upload`` then pushes
changed configs to the Hub dataset repo. Re-running with nothing changed prepares and uploads nothing.
``--num_workers N`` splits the clip work over N processes (the output is the same as with one).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file: import the package, never this folder's modules as top-level names.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402

from finetuning.locks import FolderBusy  # noqa: E402
from finetuning.preparation.prepare import PreparationError, prepare_dataset  # noqa: E402
from finetuning.preparation.upload import HubRemote, PublicRepoError, sync_dataset  # noqa: E402
from finetuning.resources import ModelUnavailable  # noqa: E402
from finetuning.settings import SettingsError, add_settings_arguments, settings_from_args  # noqa: E402
from finetuning.settings_rules import check_speakers  # noqa: E402

ALL_SPEAKERS = ("all", "both")
LAUNCHER_WORLD_SIZE = "WORLD_SIZE"  # several processes of one launch would write the same folders


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--speaker",
        default="all",
        help="speaker name(s), comma-separated, or 'all'/'both' for TRAIN_SPEAKERS (default: all)",
    )
    parser.add_argument("--output_dir", help="local dataset folder (default: DATASET_DIR)")
    parser.add_argument("--max_samples", type=int, help="use at most N source clips per speaker (quick trials)")
    parser.add_argument(
        "--num_workers", type=int, help="processes that decode, gate and encode clips (default: PREPARATION_WORKERS)"
    )
    parser.add_argument("--upload", action="store_true", help="push changed speaker configs to the Hub")
    parser.add_argument("--repo_id", help="Hub dataset repo for --upload (default: HF_DATASET_REPO)")
    visibility = parser.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=None, help="private repo")
    visibility.add_argument("--public", dest="private", action="store_false", help="public repo")
    parser.add_argument("--tokenizer_path", help="speech tokenizer (default: TOKENIZER_PATH)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every rejected clip")
    add_settings_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if int(os.environ.get(LAUNCHER_WORLD_SIZE, "1")) > 1:  # set by accelerate launch / torchrun, not a setting
        print("error: run data preparation as one command and use --num_workers N for parallel work", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        settings = settings_from_args(
            args,
            {
                "DATASET_DIR": args.output_dir,
                "HF_DATASET_REPO": args.repo_id,
                "HF_DATASET_PRIVATE": args.private,
                "TOKENIZER_PATH": args.tokenizer_path,
                "PREPARATION_WORKERS": args.num_workers,
            },
        )
    except (SettingsError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    speakers = None if args.speaker.lower() in ALL_SPEAKERS else [s.strip() for s in args.speaker.split(",")]
    try:  # a name becomes a folder of DATASET_DIR: "../x" would write outside it
        check_speakers("--speaker", tuple(speakers or ()) or settings.TRAIN_SPEAKERS)
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.max_samples is not None and args.max_samples < 1:
        print("error: --max_samples must be >= 1", file=sys.stderr)
        return 2
    if args.upload and not settings.HF_DATASET_REPO:
        print("error: --upload needs --repo_id or HF_DATASET_REPO in .env", file=sys.stderr)
        return 2
    try:
        reports = prepare_dataset(settings, speakers, max_samples=args.max_samples)
    except (PreparationError, ModelUnavailable, FolderBusy) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"dataset: {Path(settings.DATASET_DIR).resolve()}")
    print(json.dumps([r.as_dict() for r in reports], indent=2))
    if args.upload:
        remote = HubRemote(
            settings.HF_DATASET_REPO,
            token=settings.HF_TOKEN,
            private=settings.HF_DATASET_PRIVATE,
            public_ok=settings.HF_DATASET_PUBLIC_OK,
        )
        try:
            result = sync_dataset(settings.DATASET_DIR, remote, [r.speaker for r in reports])
        except PublicRepoError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(
            f"upload to {settings.HF_DATASET_REPO}: uploaded {result.uploaded or 'nothing'}, "
            f"already there {result.skipped or 'none'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
