"""Format ``recordings``: long files made inside the tests from the bundled espeak sentences, joined with known
pauses (and one sentence in the other bundled voice), cut into clips, transcribed, filtered and prepared."""

import json
import os
from pathlib import Path

import datasets
import librosa
import numpy as np
import pytest
import soundfile as sf
from conftest import VOICES_DIR, make_settings

from finetuning.constants import SAMPLE_RATE
from finetuning.preparation.audio import load_mono_24k
from finetuning.preparation.from_recordings import CACHE_DIR, ENTRY_FILE, read_recordings
from finetuning.preparation.prepare import PreparationError, prepare_dataset, resolve_speakers
from finetuning.preparation.recordings import (
    SegmentRules,
    decode_recording,
    plan_segments,
    speech_regions,
)
from finetuning.preparation.transcripts import read_sidecar

PAUSES_S = (0.8, 0.6, 0.9, 0.7)  # between the five sentences; every one longer than SEGMENT_MIN_PAUSE_S
LEAD_S, TAIL_S = 0.5, 0.6
OTHER_VOICE_AT = 2  # the third sentence is the Swahili (female) voice: the "interviewer"
BOUNDARY_TOLERANCE_S = 0.15
SPEECH_TOP_DB = 40.0  # speech edges inside a bundled clip: as the quality gate counts silence (40 dB under peak)
RULES = SegmentRules(min_s=1.0, max_s=15.0, min_pause_s=0.3, pad_s=0.1, vad_threshold=0.5)


def _sentences(speaker: str, numbers) -> list[tuple[np.ndarray, str]]:
    rows = [json.loads(line) for line in (VOICES_DIR / speaker / "metadata.jsonl").read_text().splitlines()]
    return [(load_mono_24k(VOICES_DIR / speaker / rows[n]["audio"]), rows[n]["text"]) for n in numbers]


def join_sentences(first: int = 0) -> tuple[np.ndarray, list[tuple[float, float]], list[str]]:
    """One 24 kHz recording of five sentences with PAUSES_S between them: (samples, true speech (start_s, end_s)
    of each sentence, texts). The sentence at OTHER_VOICE_AT is in the Swahili voice."""
    english = _sentences("english_speaker", range(first, first + 4))
    parts = [*english[:OTHER_VOICE_AT], *_sentences("swahili_speaker", [0]), *english[OTHER_VOICE_AT:]]
    pieces, speech, texts = [np.zeros(round(LEAD_S * SAMPLE_RATE), np.float32)], [], []
    position = len(pieces[0])
    for index, (clip, text) in enumerate(parts):
        _, (onset, offset) = librosa.effects.trim(clip, top_db=SPEECH_TOP_DB)
        speech.append(((position + onset) / SAMPLE_RATE, (position + offset) / SAMPLE_RATE))
        texts.append(text)
        pause = PAUSES_S[index] if index < len(PAUSES_S) else TAIL_S
        pieces += [clip, np.zeros(round(pause * SAMPLE_RATE), np.float32)]
        position += len(clip) + len(pieces[-1])
    return np.concatenate(pieces), speech, texts


def write_container(path: Path, samples: np.ndarray, codec: str, rate: int = SAMPLE_RATE) -> Path:
    """Encode mono float samples into ``path``'s container with PyAV (FFmpeg inside the wheel)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        frame_size = stream.codec_context.frame_size or 1024
        pcm = np.round(np.clip(samples, -1, 1) * 32767).astype(np.int16)
        for start in range(0, len(pcm), frame_size):
            frame = av.AudioFrame.from_ndarray(pcm[None, start : start + frame_size], format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def write_srt(path: Path, cues: list[tuple[float, float, str]]) -> Path:
    def stamp(seconds: float) -> str:
        ms = round(seconds * 1000)
        return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"

    blocks = [f"{i}\n{stamp(s)} --> {stamp(e)}\n{text}\n" for i, (s, e, text) in enumerate(cues, 1)]
    path.write_text("\n".join(blocks), encoding="utf-8")
    return path


def build_tiny_whisper(folder: Path) -> Path:
    """A randomly initialised Whisper of the real classes, with a byte-level tokenizer and a generation config
    that can force a language: the ASR pipeline runs end to end offline (its text is garbage)."""
    import torch
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(bytes_to_unicode().values())}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    end = "<|endoftext|>"
    tokenizer = WhisperTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), unk_token=end, bos_token=end, eos_token=end
    )
    specials = ["<|startoftranscript|>", "<|en|>", "<|sw|>", "<|translate|>", "<|transcribe|>", "<|notimestamps|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in [end, *specials]}
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=80,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_target_positions=48,
        pad_token_id=ids[end],
        bos_token_id=ids[end],
        eos_token_id=ids[end],
        decoder_start_token_id=ids["<|startoftranscript|>"],
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    generation = model.generation_config
    generation.lang_to_id = {"<|en|>": ids["<|en|>"], "<|sw|>": ids["<|sw|>"]}
    generation.task_to_id = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    generation.no_timestamps_token_id = ids["<|notimestamps|>"]
    generation.is_multilingual = True
    generation._from_model_config = False  # else loading rebuilds it from the model config, without the ids
    model.save_pretrained(folder)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def recording():
    return join_sentences()


def test_vad_cuts_one_clip_per_sentence_in_the_pauses(recording):
    samples, speech, _ = recording
    segments = plan_segments(speech_regions(samples, RULES), samples, RULES)
    assert len(segments) == len(speech)
    for segment, (onset, offset) in zip(segments, speech, strict=True):
        # each cut lies in the pause next to its sentence: within the tolerance of the true speech edge, outside
        # the speech by at most the padding (never mid-word)
        assert onset - RULES.pad_s - BOUNDARY_TOLERANCE_S <= segment.start_s <= onset + BOUNDARY_TOLERANCE_S
        assert offset - BOUNDARY_TOLERANCE_S <= segment.end_s <= offset + RULES.pad_s + BOUNDARY_TOLERANCE_S
    assert all(a.end_s <= b.start_s for a, b in zip(segments, segments[1:], strict=False))


def test_long_speech_splits_at_its_quietest_point_and_short_speech_joins_its_neighbour():
    rng = np.random.default_rng(0)
    samples = (0.3 * rng.standard_normal(30 * SAMPLE_RATE)).astype(np.float32)
    quiet_at_s = 9.0
    samples[round(quiet_at_s * SAMPLE_RATE) : round((quiet_at_s + 0.05) * SAMPLE_RATE)] *= 0.01
    regions = [(0.5, 20.5), (21.0, 21.4), (21.6, 24.0)]  # 20 s of speech, then 0.4 s joining the next 2.4 s
    segments = plan_segments(regions, samples, RULES)
    assert len(segments) == 3
    assert abs(segments[0].end_s - (quiet_at_s + 0.025)) < 0.03 and abs(segments[1].start_s - segments[0].end_s) < 1e-9
    assert segments[1].end_s - segments[1].start_s <= RULES.max_s
    assert segments[2].start_s == pytest.approx(21.0 - RULES.pad_s) and segments[2].end_s == pytest.approx(24.1)


@pytest.mark.parametrize(
    ("suffix", "codec"), [("flac", "flac"), ("mp3", "libmp3lame"), ("mp4", "aac"), ("webm", "libopus")]
)
def test_containers_decode_to_the_same_speech(tmp_path, recording, suffix, codec):
    samples, speech, _ = recording
    path = write_container(tmp_path / f"talk.{suffix}", samples, codec)
    decoded = decode_recording(path)
    assert abs(len(decoded) - len(samples)) / SAMPLE_RATE < 0.1  # encoder priming/padding only
    assert len(plan_segments(speech_regions(decoded, RULES), decoded, RULES)) == len(speech)


def test_a_file_without_audio_is_unreadable_and_a_single_file_is_a_recordings_source(tmp_path):
    from finetuning.preparation.audio import AudioDecodeError
    from finetuning.preparation.sources import detect_format

    assert detect_format(str(tmp_path / "interview.MKV")) == "recordings"

    (tmp_path / "notes.mp4").write_bytes(b"not a video at all")
    with pytest.raises(AudioDecodeError, match="notes.mp4"):
        decode_recording(tmp_path / "notes.mp4")


def _manifest(tmp_path: Path, source: Path, **entry) -> Path:
    manifest = {
        "english_speaker": {
            "source": str(source),
            "format": "recordings",
            "language": "english",
            "reference": [str(VOICES_DIR / "english_speaker.wav")],
            **entry,
        }
    }
    path = tmp_path / "speakers.json"
    path.write_text(json.dumps(manifest))
    return path


def test_asr_path_runs_end_to_end_and_the_other_voice_is_filtered_out(tmp_path, tiny_model_dir, recording):
    samples, speech, _ = recording
    folder = tmp_path / "interviews"
    folder.mkdir()
    sf.write(folder / "talk.wav", samples, SAMPLE_RATE)
    whisper = build_tiny_whisper(tmp_path / "tiny_whisper")
    settings = make_settings(
        tmp_path,
        tiny_model_dir,
        TRAIN_SPEAKERS="english_speaker",
        SPEAKERS_MANIFEST=_manifest(tmp_path, folder),
        ASR_MODEL=whisper,
        MIN_ASR_CONFIDENCE=0.0,  # a random Whisper is never confident: let its garbage text through once
        MIN_CHARS_PER_S=0.0,
        MAX_CHARS_PER_S=1000.0,
        VALIDATION_FRACTION=0.0,
    )
    (report,) = prepare_dataset(settings, report=lambda _: None)
    # the Swahili sentence is rejected by the speaker filter (resemblyzer GE2E, the real offline scorer: the
    # tiny random models cannot tell voices apart); the four English sentences are kept
    assert report.rejected == {"other_speaker": 1} and report.kept == len(speech) - 1
    assert report.hours_in == pytest.approx(len(samples) / SAMPLE_RATE / 3600, rel=1e-3)
    rows = datasets.load_dataset(settings.DATASET_DIR, name="english_speaker", split="train")
    assert sorted(rows["id"]) == [f"talk-{i:05d}" for i in range(len(speech)) if i != OTHER_VOICE_AT]
    assert all(text.strip() for text in rows["text"])  # Whisper's (garbage) text, one per clip

    # thresholds apply when the cache is read: the default confidence rejects every random-Whisper clip as
    # low_asr_confidence without segmenting or transcribing again
    strict = make_settings(tmp_path, tiny_model_dir, ASR_MODEL=whisper)
    spec = resolve_speakers(settings, ["english_speaker"])[0]
    cache = Path(settings.DATASET_DIR) / CACHE_DIR / "english_speaker"
    read = read_recordings(spec, strict, cache)
    assert read.segmented == [] and {item.problem for item in read.items} == {"low_asr_confidence"}


def test_srt_sidecar_gives_exactly_its_texts_and_adding_a_recording_segments_only_it(
    tmp_path, tiny_model_dir, recording
):
    samples, speech, texts = recording
    folder = tmp_path / "chapters"
    folder.mkdir()
    english = [i for i in range(len(speech)) if i != OTHER_VOICE_AT]
    cues = [(speech[i][0] - 0.1, speech[i][1] + 0.1, f"<i>{texts[i]}</i>") for i in english]
    sf.write(folder / "one.flac", samples, SAMPLE_RATE)
    write_srt(folder / "one.srt", cues)
    assert [s.text for s in read_sidecar(folder / "one.srt")] == [texts[i] for i in english]
    settings = make_settings(
        tmp_path,
        tiny_model_dir,
        TRAIN_SPEAKERS="english_speaker",
        SPEAKERS_MANIFEST=_manifest(tmp_path, folder),
        ASR_MODEL="",  # subtitles only: a recording needing ASR would be an error
        MIN_SPEAKER_SIMILARITY=0.0,
        VALIDATION_FRACTION=0.0,
    )
    (first,) = prepare_dataset(settings, report=lambda _: None)
    rows = datasets.load_dataset(settings.DATASET_DIR, name="english_speaker", split="train")
    assert sorted(rows["text"]) == sorted(texts[i] for i in english) and first.rejected == {}
    for row in rows:
        assert row["duration_s"] == pytest.approx(cues[int(row["id"][-5:])][1] - cues[int(row["id"][-5:])][0], abs=0.01)

    (again,) = prepare_dataset(settings, report=lambda _: None)
    assert not again.prepared and again.hours_in == first.hours_in

    cache = Path(settings.DATASET_DIR) / CACHE_DIR / "english_speaker"
    (entry,) = cache.glob(f"*/{ENTRY_FILE}")
    written = os.stat(entry).st_mtime_ns
    other, _, other_texts = join_sentences(first=4)
    sf.write(folder / "two.wav", other, SAMPLE_RATE)
    write_srt(folder / "two.srt", [(0.2, 2.0, other_texts[0])])
    spec = resolve_speakers(settings, ["english_speaker"])[0]
    assert read_recordings(spec, settings, cache).segmented == [str(folder / "two.wav")]
    assert os.stat(entry).st_mtime_ns == written
    (third,) = prepare_dataset(settings, report=lambda _: None)
    assert third.prepared and third.kept == first.kept + 1

    # one.flac cannot be read for a moment (a network share dropping out): its cache entry must survive
    from finetuning.preparation import from_recordings

    real_digest = from_recordings._file_digest

    def flaky_digest(path):
        if Path(path).name == "one.flac":
            raise PermissionError(13, "Permission denied", str(path))
        return real_digest(path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(from_recordings, "_file_digest", flaky_digest)
        assert [item.problem for item in read_recordings(spec, settings, cache).items if item.audio is None] == [
            "unreadable"
        ]
    assert entry.exists() and os.stat(entry).st_mtime_ns == written
    assert read_recordings(spec, settings, cache).segmented == []


def test_a_recording_without_subtitles_and_without_asr_model_stops_the_speaker(tmp_path, tiny_model_dir, recording):
    folder = tmp_path / "talks"
    folder.mkdir()
    sf.write(folder / "talk.wav", recording[0], SAMPLE_RATE)
    settings = make_settings(
        tmp_path,
        tiny_model_dir,
        TRAIN_SPEAKERS="english_speaker",
        SPEAKERS_MANIFEST=_manifest(tmp_path, folder),
        ASR_MODEL="",
    )
    with pytest.raises(PreparationError, match="english_speaker.*talk.wav.*ASR_MODEL is empty"):
        prepare_dataset(settings, report=lambda _: None)


def test_vtt_sidecar_keeps_milliseconds_and_drops_markup(tmp_path):
    path = tmp_path / "talk.vtt"
    path.write_text(
        "WEBVTT\n\n00:00:01.250 --> 00:00:03.040\n<v Ann>Good morning,</v>\nhow are you?\n\n"
        "00:01:02.500 --> 00:01:04.000\n\n00:01:05.000 --> 00:01:07.125\n{\\an8}The <b>coffee</b> is too hot.\n"
    )
    segments = read_sidecar(path)
    assert [(s.start_s, s.end_s, s.text) for s in segments] == [
        (1.25, 3.04, "Good morning, how are you?"),
        (65.0, 67.125, "The coffee is too hot."),
    ]


def test_demo_sessions_become_both_speakers_configs_without_the_interviewer(tmp_path, tiny_model_dir):
    from finetuning.demo import write_demo_recordings
    from finetuning.settings import BUNDLED_SPEAKERS

    manifest = write_demo_recordings(tmp_path / "recordings", VOICES_DIR)
    settings = make_settings(tmp_path, tiny_model_dir, SPEAKERS_MANIFEST=manifest, ASR_MODEL="")
    reports = prepare_dataset(settings, report=lambda _: None)
    for report, speaker in zip(reports, BUNDLED_SPEAKERS, strict=True):
        corpus = [
            json.loads(line)["text"] for line in (VOICES_DIR / speaker / "metadata.jsonl").read_text().splitlines()
        ]
        assert report.rejected == {"other_speaker": 1} and report.kept == len(corpus)
        kept = datasets.concatenate_datasets(
            [datasets.load_dataset(settings.DATASET_DIR, name=speaker, split=s) for s in ("train", "validation")]
        )
        assert sorted(kept["text"]) == sorted(corpus)


def build_tiny_ctc(folder: Path, adapters: bool = False) -> Path:
    """A randomly initialised wav2vec2 CTC model with a character vocabulary; with ``adapters``, MMS-style: one
    vocabulary and output-head adapter per language (``eng`` with 30 symbols, ``swh`` with 27)."""
    import torch
    from safetensors.torch import save_file
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
    )

    folder.mkdir(parents=True, exist_ok=True)
    letters = {"eng": "abcdefghijklmnopqrstuvwxyz'", "swh": "abdefghijklmnoprstuvwyz'"}
    vocabs = {
        code: {"<pad>": 0, "<unk>": 1, "|": 2, **{c: i + 3 for i, c in enumerate(chars)}}
        for code, chars in letters.items()
    }
    (folder / "vocab.json").write_text(json.dumps(vocabs if adapters else vocabs["eng"]))
    tokenizer = Wav2Vec2CTCTokenizer(str(folder / "vocab.json"), target_lang="eng" if adapters else None)
    extractor = Wav2Vec2FeatureExtractor(sampling_rate=16_000, return_attention_mask=True)
    config = Wav2Vec2Config(
        vocab_size=len(vocabs["eng"]),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(16, 16),
        conv_stride=(5, 4),
        conv_kernel=(10, 8),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer",
        pad_token_id=0,
        adapter_attn_dim=4 if adapters else None,
    )
    torch.manual_seed(0)
    model = Wav2Vec2ForCTC(config)
    model.save_pretrained(folder)
    for code, vocab in vocabs.items() if adapters else ():
        head = {"lm_head.weight": torch.randn(len(vocab), config.hidden_size), "lm_head.bias": torch.zeros(len(vocab))}
        save_file(head, str(folder / f"adapter.{code}.safetensors"))
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["whisper", "ctc"])
def test_transcriber_gives_text_and_a_probability_per_clip_in_batches(tmp_path, family):
    from finetuning.preparation.sources import SourceError
    from finetuning.preparation.transcripts import Transcriber

    folder = (build_tiny_whisper if family == "whisper" else build_tiny_ctc)(tmp_path / family)
    clips = [clip for clip, _ in _sentences("english_speaker", range(3))]
    transcriber = Transcriber(str(folder), "cpu", batch_size=2)
    results = transcriber.transcribe(clips, "english")
    assert len(results) == len(clips)
    for text, confidence in results:
        assert isinstance(text, str) and 0.0 <= confidence <= 1.0
    if family == "whisper":
        # a random Whisper spreads its probability over the whole vocabulary: far below the default threshold
        assert max(confidence for _, confidence in results) < 0.35
        with pytest.raises(SourceError, match="klingon"):
            transcriber.transcribe(clips[:1], "klingon")


def test_command_counts_an_undecodable_recording_and_names_bad_subtitles_and_missing_folders(
    tmp_path, tiny_model_dir, capsys, caplog
):
    """Through the command's own ``main`` (in this process: a subprocess would spend most of its time importing):
    a file FFmpeg cannot decode is one counted ``unreadable`` rejection beside a good recording; subtitles that
    are not SubRip, and a source folder that does not exist, each stop only their speaker, in one error line."""
    from conftest import speechlike, write_wav

    from finetuning.data_preparation import main

    data = tmp_path / "data"
    write_wav(data / "good" / "talk.wav", speechlike(3.0, seed=1))
    (data / "good" / "talk.srt").write_text("1\n00:00:00,200 --> 00:00:02,600\nA sentence spoken here.\n")
    (data / "good" / "phone.mp4").write_bytes(b"\x00\x00\x00 not a video")
    write_wav(data / "subtitled" / "talk.wav", speechlike(3.0, seed=2))
    (data / "subtitled" / "talk.srt").write_text("these are not subtitles\n")
    reference = [str(VOICES_DIR / "english_speaker.wav")]
    manifest = {
        name: {"source": name, "format": "recordings", "language": "english", "reference": reference}
        for name in ("good", "subtitled", "ghost")
    }
    (data / "speakers.json").write_text(json.dumps(manifest))
    settings = {
        "SPEAKERS_MANIFEST": data / "speakers.json",
        "TRAIN_SPEAKERS": "good,subtitled,ghost",
        "DATASET_DIR": tmp_path / "dataset",
        "TOKENIZER_PATH": tiny_model_dir / "speech_tokenizer",
        "INIT_MODEL_PATH": tiny_model_dir,
        "DEVICE": "cpu",
        "MIN_SPEAKER_SIMILARITY": 0,
        "ASR_MODEL": "",
    }
    env = tmp_path / "recordings.env"
    env.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))

    assert main(["--env-file", str(env)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in errors[0]
    for name in ("speaker subtitled", str(data / "subtitled" / "talk.srt"), "speaker ghost", str(data / "ghost")):
        assert name in errors[0]
    assert errors[0].endswith("prepared: good")
    summary = json.loads((tmp_path / "dataset" / "preparation_summary.json").read_text())
    assert summary["good"]["kept"] == 1 and summary["good"]["rejected"] == {"unreadable": 1}
    assert f"{data / 'good' / 'phone.mp4'}: unreadable" in caplog.text


def test_an_mms_style_model_switches_to_the_language_adapter_of_the_manifest(tmp_path):
    from finetuning.preparation.sources import SourceError
    from finetuning.preparation.transcripts import Transcriber

    transcriber = Transcriber(str(build_tiny_ctc(tmp_path / "mms", adapters=True)), "cpu", batch_size=2)
    clips = [clip for clip, _ in _sentences("swahili_speaker", range(2))]
    swahili = transcriber.transcribe(clips, "swh")
    assert transcriber._model.lm_head.out_features == 27 and len(swahili) == 2
    swahili_symbols = set("abdefghijklmnoprstuvwyz' ")  # swh's vocabulary has no c, q, x
    assert all(set(text.replace("<unk>", "")) <= swahili_symbols for text, _ in swahili)
    transcriber.transcribe(clips[:1], "english")  # an ISO 639 name: its 639-3 code, eng
    assert transcriber._model.lm_head.out_features == 30
    with pytest.raises(SourceError, match="no adapter for language 'french'.*fra"):
        transcriber.transcribe(clips[:1], "french")
