"""The table of settings: every key with its default, unit, one-line help and allowed values.

``finetuning.settings`` loads, parses and validates these from ``.env``; this module only declares them, in the
order ``.env.training.example`` lists them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetuning import atomic
from finetuning.settings_rules import BOUNDS, check_device, check_repo_id, check_speakers, check_trackers

BUNDLED_SPEAKERS = ("english_speaker", "swahili_speaker")
# The settings reference (finetuning/SETTINGS.md) groups the table by stage: (title, first key, guide). A section
# runs from its first key to the next section's, in the order of the fields below.
SECTIONS = (
    ("Data preparation", "TRAIN_SPEAKERS", "preparation/README.md"),
    ("Long recordings", "SEGMENT_MIN_S", "preparation/README.md#long-recordings"),
    ("Model", "INIT_MODEL_PATH", "training/README.md"),
    ("Training", "OUTPUT_DIR", "training/README.md"),
    ("Speed", "TORCH_COMPILE", "training/README.md#speed"),
    ("LoRA", "FINETUNE_METHOD", "training/README.md#lora-fine-tuning"),
    ("Batches, data loading, resume, tracking", "MAX_BATCH_TOKENS", "training/README.md#training-at-scale"),
    ("Auxiliary losses", "USE_AUXILIARY_LOSSES", "training/README.md#auxiliary-losses"),
    ("Evaluation", "SPEAKER_SIM_BACKEND", "evaluation/README.md"),
)
LORA_DEFAULT_TARGETS = tuple("q_proj k_proj v_proj o_proj gate_proj up_proj down_proj linear_fc1 linear_fc2".split())
LORA_DEFAULT_FULLY_TRAINED = ("codec_head", "lm_head", "codec_embedding")  # the codec heads and embeddings


def _setting(default: Any, unit: str, help: str, choices=None, secret=False, check=None, **bounds: float):
    """A field with its default, unit and one-line help, and the values it allows, enforced by ``validate``:
    ``choices``, ``bounds`` (``ge`` >=, ``gt`` >, ``le`` <=, ``lt`` <; lower bound first) and ``check(key, value)``,
    which raises SettingsError."""
    if not set(bounds) <= set(BOUNDS):
        raise TypeError(f"unknown bounds {sorted(set(bounds) - set(BOUNDS))}; use {', '.join(BOUNDS)}")
    metadata = {"unit": unit, "help": help, "choices": choices, "secret": secret, "check": check, "bounds": bounds}
    return field(default=default, repr=not secret, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    # --- data --------------------------------------------------------------------------------------------
    TRAIN_SPEAKERS: tuple[str, ...] = _setting(
        BUNDLED_SPEAKERS,
        "comma-separated names",
        "speakers to prepare and train; each is one dataset config",
        check=check_speakers,
    )
    VOICES_DIR: str = _setting(
        "voices", "path", "folder with <speaker>.wav reference clips and <speaker>/metadata.jsonl corpora"
    )
    DATASET_DIR: str = _setting("data/dataset", "path", "local prepared dataset (one config per speaker)")
    HF_DATASET_REPO: str = _setting(
        "",
        "Hub repo id",
        "dataset repo to upload to / train from, e.g. user/qwen3-tts-voices; empty = local only",
        check=check_repo_id,
    )
    HF_DATASET_REVISION: str = _setting(
        "",
        "commit, branch or tag",
        "Hub dataset revision training reads; empty = the repo's commit at the start, recorded with every state",
    )
    HF_DATASET_PRIVATE: bool = _setting(True, "bool", "create the Hub dataset repo as private")
    # --- nothing lost: guards on what a run may overwrite or publish ---------------------------------------
    HF_DATASET_PUBLIC_OK: bool = _setting(
        False, "bool", "upload to an existing public Hub dataset repo (voices are personal data: off refuses it)"
    )
    HF_TOKEN: str = _setting("", "secret", "Hugging Face token for upload and private repos", secret=True)
    VALIDATION_FRACTION: float = _setting(
        0.1, "fraction", "share of each speaker's clips held out for validation when no split is given", ge=0, lt=1
    )
    SPEAKERS_MANIFEST: str = _setting(
        "", "path", "optional JSON naming each speaker's source, format, language and reference clips"
    )
    TEST_FRACTION: float = _setting(
        0.0, "fraction", "share of each speaker's clips held out as a test split", ge=0, lt=1
    )
    MIN_DURATION_S: float = _setting(0.5, "seconds", "clips shorter than this are rejected", gt=0)
    MAX_DURATION_S: float = _setting(20.0, "seconds", "clips longer than this are rejected")
    MAX_SILENCE_FRACTION: float = _setting(
        0.7, "fraction", "clips whose share of silence (40 dB below their peak) exceeds this are rejected", gt=0, le=1
    )
    MAX_CLIPPED_FRACTION: float = _setting(
        0.001, "fraction", "clips with more samples at full scale than this share are rejected", ge=0, le=1
    )
    MIN_RMS_DBFS: float = _setting(-45.0, "dBFS", "clips quieter than this RMS level are rejected", lt=0)
    MIN_CHARS_PER_S: float = _setting(
        1.0, "chars/second", "transcripts slower than this (non-space characters per second) are rejected", ge=0
    )
    MAX_CHARS_PER_S: float = _setting(
        35.0, "chars/second", "transcripts faster than this (non-space characters per second) are rejected"
    )
    NORMALIZE_LOUDNESS: bool = _setting(False, "bool", "scale kept clips to TARGET_LOUDNESS_LUFS (ITU-R BS.1770)")
    TARGET_LOUDNESS_LUFS: float = _setting(-23.0, "LUFS", "integrated loudness when NORMALIZE_LOUDNESS", lt=0)
    TRUE_PEAK_CEILING_DBTP: float = _setting(-1.0, "dBTP", "normalisation keeps true peaks under this", le=0)
    ENCODE_BATCH_SIZE: int = _setting(8, "clips", "clips per speech-tokenizer batch during preparation", ge=1)
    PREPARATION_WORKERS: int = _setting(1, "processes", "parallel clip processes (CUDA: 1 per GPU); same output", ge=1)
    MAX_SHARD_SIZE_MB: float = _setting(256.0, "MB", "upper bound of one parquet shard of the dataset", gt=0)
    # --- recordings (format "recordings": long files cut into clips) ------------------------------------------
    SEGMENT_MIN_S: float = _setting(
        1.0, "seconds", "recordings: speech shorter than this joins its nearer neighbour (gap <= 1 s) if it fits", gt=0
    )
    SEGMENT_MAX_S: float = _setting(
        15.0,
        "seconds",
        "recordings: longer speech is split at its quietest point (>= 2 x SEGMENT_MIN_S; Whisper hears 30 s)",
        gt=0,
        le=30,
    )
    SEGMENT_MIN_PAUSE_S: float = _setting(
        0.3, "seconds", "recordings: a pause at least this long ends a clip (shorter ones stay inside)", gt=0
    )
    SEGMENT_PAD_S: float = _setting(
        0.1, "seconds", "recordings: silence kept before and after the speech (at most half the pause)", ge=0
    )
    VAD_THRESHOLD: float = _setting(0.5, "probability", "recordings: silero-vad speech probability", gt=0, lt=1)
    MIN_SPEAKER_SIMILARITY: float = _setting(
        0.6,
        "cosine",
        "recordings: clips less similar to the speaker's reference (resemblyzer GE2E) are rejected; 0 = off",
        ge=0,
        le=1,
    )
    MIN_ASR_CONFIDENCE: float = _setting(
        0.35,
        "probability",
        "recordings transcribed by ASR_MODEL: clips whose mean token probability is lower are rejected",
        ge=0,
        le=1,
    )
    ASR_BATCH_SIZE: int = _setting(8, "clips", "recordings: clips per ASR_MODEL batch when transcribing", ge=1)
    # --- model -------------------------------------------------------------------------------------------
    INIT_MODEL_PATH: str = _setting(
        "Qwen/Qwen3-TTS-12Hz-1.7B-Base",
        "Hub id or path",
        "model to fine-tune (12 Hz, 0.6B or 1.7B): a Base model, or a CustomVoice one whose preset speakers are kept",
    )
    SPEAKER_ENCODER_PATH: str = _setting(
        "",
        "Hub id or path",
        "a custom_voice INIT_MODEL_PATH only (it ships no speaker encoder): the Base model of the same size whose "
        "speaker encoder computes the new speakers' x-vectors",
    )
    TOKENIZER_PATH: str = _setting(
        "Qwen/Qwen3-TTS-Tokenizer-12Hz", "Hub id or path", "12 Hz speech tokenizer used to precompute codes"
    )
    DEVICE: str = _setting(
        "auto",
        "device",
        "device for data preparation and evaluation (cpu also forces training onto the CPU): auto, cpu, cuda, cuda:N",
        check=check_device,
    )
    # --- training ----------------------------------------------------------------------------------------
    OUTPUT_DIR: str = _setting("outputs/run", "path", "where checkpoints, logs and the exported model go")
    BATCH_SIZE: int = _setting(2, "utterances", "per-device batch size when MAX_BATCH_TOKENS is 0", ge=1)
    LEARNING_RATE: float = _setting(2e-5, "1/step", "peak learning rate (OPTIMIZER)", gt=0)
    NUM_EPOCHS: int = _setting(3, "epochs", "passes over the training data", ge=1)
    GRADIENT_ACCUMULATION_STEPS: int = _setting(4, "micro-batches", "micro-batches per optimizer step", ge=1)
    MIXED_PRECISION: str = _setting("bf16", "mode", "accelerate mixed precision", choices=("no", "fp16", "bf16"))
    GRADIENT_CHECKPOINTING: bool = _setting(
        False,
        "bool",
        "recompute talker and code-predictor layer activations in backward: less memory, one more forward",
    )
    SEED: int = _setting(42, "int", "seed for splits, sampling and initialisation")
    TRAINING_LAYOUT: str = _setting(
        "mixed",
        "mode",
        "text layout(s) trained, i.e. the non_streaming_mode values the export answers to: mixed = both, drawn "
        "per sample (generate_custom_voice's default True and generate_voice_clone's default False); "
        "non_streaming / streaming = that one only",
        choices=("mixed", "non_streaming", "streaming"),
    )
    LANGUAGE_AUTO_FRACTION: float = _setting(
        0.2,
        "fraction",
        "share of samples trained with the languageless prefix that stock generation uses when language= is left "
        'out ("Auto"), drawn per sample and epoch; the rest name their row\'s language; 0 = never',
        ge=0,
        le=1,
    )
    TRAINING_MODE: str = _setting(
        "custom_voice",
        "mode",
        "custom_voice = the trained speakers by name (generate_custom_voice); voice_clone = a Base model that "
        "clones any voice from a reference clip (generate_voice_clone), trained on many speakers; voice_design = a "
        "voice from each clip's instruct description, no speaker (generate_voice_design)",
        choices=("custom_voice", "voice_clone", "voice_design"),
    )
    CLONE_ICL_FRACTION: float = _setting(
        0.5,
        "fraction",
        "voice_clone: share of samples conditioned in ICL mode (reference transcript + codes + x-vector); the "
        "rest in x-vector mode (x_vector_only_mode=True)",
        ge=0,
        le=1,
    )
    CLONE_REF_MAX_S: float = _setting(
        10.0,
        "seconds",
        "voice_clone: longest clip drawn as an ICL reference (users give 3-10 s); x-vectors use at most the first "
        "this many seconds of a clip",
        gt=0,
    )
    REPLAY_FRACTION: float = _setting(
        0.0,
        "fraction",
        "a custom_voice INIT_MODEL_PATH only: share of training samples that replay the init model's own greedy "
        "speech of its preset speakers (generated once before training, cached), so they are not forgotten; 0 = off",
        ge=0,
        lt=1,
    )
    REPLAY_SAMPLES: int = _setting(
        4, "texts", "replay: texts each preset speaker says (the first distinct training texts)", ge=1
    )
    SUB_TALKER_LOSS_WEIGHT: float = _setting(0.3, "weight", "weight of the sub-talker (codebooks 2-16) loss", ge=0)
    WEIGHT_DECAY: float = _setting(
        0.01, "coefficient", "decoupled weight decay (OPTIMIZER; not on biases, norms, embeddings)", ge=0
    )
    WARMUP_STEPS: int = _setting(10, "optimizer steps", "linear learning-rate warmup", ge=0)
    LR_SCHEDULE: str = _setting("cosine", "name", "decay after warmup", choices=("cosine", "linear", "constant"))
    MAX_GRAD_NORM: float = _setting(
        1.0, "norm", "gradient clipping threshold; 0 disables clipping (non-finite gradients: step skipped)", ge=0
    )
    MAX_STEPS: int = _setting(
        0, "optimizer steps", "stop after this many optimizer steps; 0 = NUM_EPOCHS decides", ge=0
    )
    LOGGING_STEPS: int = _setting(10, "optimizer steps", "log the training loss every this many steps", ge=1)
    EVAL_STEPS: int = _setting(
        100, "optimizer steps", "validation loss every this many steps (and at the end); 0 = only at the end", ge=0
    )
    EVAL_MAX_BATCHES: int = _setting(
        20, "batches", "batches per process scored every EVAL_STEPS (the final validation: all); 0 = all", ge=0
    )
    SELECT_BY: str = _setting(
        "eval_loss",
        "name",
        "what picks the best/ export: eval_loss (lower), score (higher; a fixed combination), one speech metric "
        "(speaker_similarity, naturalness higher; wer, cer, eos_failure_rate lower; need EVAL_GENERATE_STEPS), none",
        choices=("eval_loss", "score", "speaker_similarity", "wer", "cer", "naturalness", "eos_failure_rate", "none"),
    )
    EARLY_STOPPING_PATIENCE: int = _setting(
        0, "evaluations", "stop after this many evaluations without improvement of SELECT_BY; 0 = never", ge=0
    )
    EARLY_STOPPING_MIN_DELTA: float = _setting(
        0.0, "SELECT_BY units", "an improvement must beat the best value by more than this", ge=0
    )
    AVERAGE_CHECKPOINTS: int = _setting(
        0,
        "states",
        "export the parameter mean of this many saved training states (AVERAGE_BY); 0 = the last step",
        ge=0,
    )
    AVERAGE_BY: str = _setting(
        "best",
        "mode",
        "which states AVERAGE_CHECKPOINTS averages: best = of the best evaluations, last = saved last",
        choices=("best", "last"),
    )
    SPEAKER_EMBEDDING_CLIPS: int = _setting(
        0, "clips", "training clips averaged into each speaker embedding besides the reference clips", ge=0
    )
    EXPORT_DIR: str = _setting("", "path", "where the exported checkpoint is written; empty = OUTPUT_DIR/model")
    # --- speed (GPU levers; defaults are safe on every machine) ---------------------------------------------
    TORCH_COMPILE: bool = _setting(False, "bool", "torch.compile the talker and code predictor (slow first steps)")
    ATTN_IMPLEMENTATION: str = _setting(
        "sdpa", "name", "attention kernels", choices=("sdpa", "eager", "flash_attention_2")
    )
    FUSED_CROSS_ENTROPY: bool = _setting(
        False, "bool", "fused linear + cross-entropy for the codec heads (liger-kernel, CUDA; no auxiliary losses)"
    )
    CPU_HEAP_CACHE: bool = _setting(
        True, "bool", "CPU runs on glibc: freed tensor memory stays in the heap for the next step (fewer page faults)"
    )
    # --- optimizer (memory lever: bytes of state per trained parameter) -----------------------------------
    OPTIMIZER: str = _setting(
        "adamw",
        "name",
        "adamw = float32 moments (8 bytes), adamw_8bit = 8-bit moments (~2 bytes; `uv sync --group bitsandbytes`), "
        "adafactor = factored second moment, no momentum (a row and a column per matrix)",
        choices=("adamw", "adamw_8bit", "adafactor"),
    )
    # --- LoRA ----------------------------------------------------------------------------------------------
    FINETUNE_METHOD: str = _setting(
        "full", "method", "full = every talker weight; lora = adapters", choices=("full", "lora")
    )
    LORA_RANK: int = _setting(16, "rank", "rank of each LoRA adapter", ge=1)
    LORA_ALPHA: float = _setting(32.0, "scale", "LoRA alpha; the update is scaled by LORA_ALPHA / LORA_RANK", gt=0)
    LORA_DROPOUT: float = _setting(0.0, "probability", "dropout on the LoRA branch's input", ge=0, lt=1)
    LORA_TARGETS: tuple[str, ...] = _setting(
        LORA_DEFAULT_TARGETS, "comma-separated names", "linear layers of the talker (its text MLP too) to adapt"
    )
    LORA_FULLY_TRAINED: tuple[str, ...] = _setting(
        LORA_DEFAULT_FULLY_TRAINED, "comma-separated names", "talker modules trained fully beside the adapters"
    )
    LORA_MERGE_SCALE: float = _setting(
        1.0,
        "scale",
        "the merged export is Base + this x the trained update (adapters and fully trained modules; adapter/ unscaled)",
        gt=0,
        le=1,
    )
    # --- data loading, resume, tracking --------------------------------------------------------------------
    MAX_BATCH_TOKENS: int = _setting(
        4096,
        "talker positions",
        "duration batching: padded positions (batch size x longest sequence) per batch; 0 = BATCH_SIZE batches",
        ge=0,
    )
    NUM_BUCKETS: int = _setting(5, "buckets", "length buckets for duration batching", ge=1)
    SPEAKER_MIXING: str = _setting(
        "balanced",
        "mode",
        "balanced = small speakers repeat (SPEAKER_MIXING_ALPHA, SPEAKER_MAX_REPEAT), proportional = as in the data",
        choices=("balanced", "proportional"),
    )
    SPEAKER_MIXING_ALPHA: float = _setting(
        0.5, "exponent", "balanced mixing: a speaker's share is proportional to clips ** alpha (0 = equal)", ge=0, le=1
    )
    SPEAKER_MAX_REPEAT: float = _setting(
        8.0, "times", "balanced mixing: a speaker's clips repeat at most this often per epoch; 0 = no cap", ge=0
    )
    DATA_STREAMING: bool = _setting(
        False, "bool", "stream the configs (reads text and codes only, never caches the audio column)"
    )
    STREAM_SHUFFLE_BUFFER: int = _setting(1000, "examples", "shuffle buffer of DATA_STREAMING (bounds memory)", ge=1)
    DATALOADER_WORKERS: int = _setting(
        2, "processes", "dataloader worker processes; 0 = load in the main process", ge=0
    )
    SAVE_STEPS: int = _setting(
        500,
        "optimizer steps",
        "save a resumable training state every this many steps; 0 = off (the last step is kept until exported)",
        ge=0,
    )
    SAVE_TOTAL_LIMIT: int = _setting(2, "states", "keep only the N training states saved last", ge=1)
    RESUME_FROM: str = _setting("", "latest or path", "resume from OUTPUT_DIR's latest state or a state folder")
    REPORT_TO: tuple[str, ...] = _setting(
        ("tensorboard",), "comma-separated names", "trackers: tensorboard, wandb, or none", check=check_trackers
    )
    WANDB_MODE: str = _setting(
        "offline", "mode", "W&B mode when REPORT_TO has wandb; offline needs no network", choices=("offline", "online")
    )
    DISTRIBUTED_TIMEOUT_MINUTES: int = _setting(
        120,
        "minutes",
        "how long a process waits at a collective (rank 0 exporting or generating for evaluation) before failing",
        ge=1,
    )
    RECORD_SAMPLE_IDS: bool = _setting(
        False, "bool", "write the ids each process trained on to OUTPUT_DIR/samples_rank<N>.jsonl (audits)"
    )
    # --- auxiliary losses ----------------------------------------------------------------------------------
    USE_AUXILIARY_LOSSES: bool = _setting(
        False, "bool", "add the mel / voice / prosody losses through the frozen speech-tokenizer decoder"
    )
    MEL_RECONSTRUCTION_WEIGHT: float = _setting(0.05, "weight", "multi-resolution log-mel loss; 0 = off", ge=0)
    VOICE_CONSISTENCY_WEIGHT: float = _setting(0.05, "weight", "1 - cosine to the speaker embedding; 0 = off", ge=0)
    PROSODY_WEIGHT: float = _setting(0.05, "weight", "energy and pitch-feature contour loss; 0 = off", ge=0)
    AUX_LOSS_EVERY_N_STEPS: int = _setting(
        16, "micro-batches", "compute the auxiliary losses every N micro-batches (they decode audio: costly)", ge=1
    )
    AUX_CROP_FRAMES: int = _setting(
        16, "frames", "length of the random crop decoded for the auxiliary losses (12.5 frames per second)", ge=2
    )
    # --- evaluation ----------------------------------------------------------------------------------------
    SPEAKER_SIM_BACKEND: str = _setting(
        "auto",
        "name",
        "speaker encoder for similarity: auto = ECAPA if it loads, else resemblyzer (reason recorded)",
        choices=("auto", "ecapa", "resemblyzer"),
    )
    ECAPA_SOURCE: str = _setting(
        "speechbrain/spkrec-ecapa-voxceleb", "Hub id or path", "speechbrain ECAPA model for speaker similarity"
    )
    NATURALNESS_BACKEND: str = _setting(
        "auto",
        "name",
        "naturalness (MOS) predictor: auto, dnsmos (speechmos DNSMOS P.835, offline) or none",
        choices=("auto", "dnsmos", "none"),
    )
    ASR_BACKEND: str = _setting(
        "auto",
        "name",
        "recogniser for WER/CER: auto = transformers ASR_MODEL if it loads, else pocketsphinx (English)",
        choices=("auto", "transformers", "pocketsphinx"),
    )
    ASR_MODEL: str = _setting(
        "openai/whisper-small",
        "Hub id or path",
        "transformers ASR model (Whisper or CTC) for WER and for recordings without subtitles; empty = none",
    )
    SCORER_ALLOW_DOWNLOAD: bool = _setting(
        False, "bool", "let evaluation scorers download weights; off = local folders and the HF cache only"
    )
    EVAL_MAX_UTTERANCES: int = _setting(
        8, "utterances", "validation utterances per speaker that evaluation generates and scores", ge=1
    )
    EVAL_MAX_SECONDS: float = _setting(20.0, "seconds", "cap on the length of each generated utterance", gt=0)
    EVAL_GENERATE_STEPS: int = _setting(
        0, "optimizer steps", "generate and score speech during training every this many steps; 0 = never", ge=0
    )

    @property
    def export_dir(self) -> Path:
        return Path(self.EXPORT_DIR) if self.EXPORT_DIR else Path(self.OUTPUT_DIR) / "model"

    def public_dict(self) -> dict[str, Any]:
        """The resolved settings with secrets removed: safe for logs, trackers, checkpoints and cards."""
        out = {}
        for f in dataclasses.fields(self):
            if f.metadata["secret"]:
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write the public (secret-free) settings as JSON (atomically: a reader never sees half a file)."""
        atomic.write_json(path, self.public_dict(), indent=2, sort_keys=True)
