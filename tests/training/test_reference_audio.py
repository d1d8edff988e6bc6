"""Reference clips read for the speaker embeddings: the prepared clips' samples, exactly, without librosa."""

import numpy as np
import pytest
from conftest import make_settings, prepare_small_dataset

from finetuning.training.data import DataError, load_reference_audio, load_references


@pytest.fixture(scope="module")
def prepared(tiny_model_dir, tmp_path_factory):
    root = prepare_small_dataset(tmp_path_factory, "reference_audio", tiny_model_dir)
    return make_settings(root, tiny_model_dir)


def test_reference_clips_are_the_datasets_decoded_samples(prepared):
    for speaker in prepared.TRAIN_SPEAKERS:
        clips = load_reference_audio(prepared, speaker)
        decoded = [row["audio"] for row in load_references(prepared, speaker)]  # the dataset's own decoding
        assert len(clips) == len(decoded) >= 1
        for clip, row in zip(clips, decoded, strict=True):
            assert row["sampling_rate"] == 24000
            assert clip.dtype == np.float32 and clip.ndim == 1
            np.testing.assert_array_equal(clip, np.asarray(row["array"], dtype=np.float32))


def test_a_reference_clip_that_is_not_24khz_mono_is_refused(prepared, monkeypatch):
    import soundfile

    read = soundfile.read
    monkeypatch.setattr(soundfile, "read", lambda source: (np.stack([read(source)[0]] * 2, axis=1), 24000))
    with pytest.raises(DataError, match="english_speaker: reference clip .* is not 24000 Hz mono"):
        load_reference_audio(prepared, "english_speaker")
