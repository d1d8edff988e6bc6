import json
import shutil

import pytest
from conftest import VOICES_DIR, make_settings

from finetuning.preparation.encoder import SpeechEncoder
from finetuning.preparation.languages import LanguageError, ModelLanguages, read_model_languages
from finetuning.preparation.prepare import PreparationError, prepare_dataset
from finetuning.tiny_model import CODEC_LANGUAGE_IDS

DIALECT_KEY = "beijing_dialect"


@pytest.fixture(scope="module")
def table() -> ModelLanguages:
    """The tiny model's languages plus one dialect key, as a real CustomVoice config carries them."""
    return ModelLanguages(ids={**CODEC_LANGUAGE_IDS, DIALECT_KEY: 2074}, source="test model")


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("en", "english"),
        ("eng", "english"),
        ("EN", "english"),
        ("English", "english"),
        ("zh", "chinese"),
        ("ger", "german"),
        ("pt", "portuguese"),
        ("auto", "auto"),
        ("ha", "hausa"),
        ("Swahili", "swahili"),
    ],
)
def test_iso_codes_and_names_resolve_to_the_model_names(table, label, expected):
    assert table.resolve(label) == expected


def test_languages_without_a_model_id_train_with_auto(table):
    assert table.trains_with_auto("hausa") and not table.trains_with_auto("english")
    assert not table.trains_with_auto("auto")


def test_unknown_label_is_refused_with_the_allowed_list(table):
    with pytest.raises(LanguageError) as caught:
        table.resolve("xx")
    message = str(caught.value)
    assert "'xx'" in message and "auto, chinese, english, french" in message and DIALECT_KEY not in message


def test_dialect_key_is_refused_as_stock_generation_refuses_it(table):
    assert DIALECT_KEY not in table.allowed
    with pytest.raises(LanguageError, match="dialect"):
        table.resolve(DIALECT_KEY)


def test_the_list_comes_from_the_model_config(tiny_model_dir, tmp_path):
    assert read_model_languages(str(tiny_model_dir)).allowed == ("auto", *sorted(CODEC_LANGUAGE_IDS))
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["talker_config"]["codec_language_id"] = {"english": 2050, "klingon": 2099}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_model_languages(str(tmp_path)).resolve("klingon") == "klingon"
    with pytest.raises(LanguageError, match="INIT_MODEL_PATH"):
        read_model_languages(str(tmp_path / "missing"))


def _speaker_with_label(tmp_path, label: str):
    voices = tmp_path / "voices"
    shutil.copytree(VOICES_DIR / "english_speaker", voices / "english_speaker")
    shutil.copy(VOICES_DIR / "english_speaker.wav", voices)
    metadata = voices / "english_speaker" / "metadata.jsonl"
    rows = [json.loads(line) | {"language": label} for line in metadata.read_text().splitlines()[:3]]
    metadata.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return voices


def test_preparation_maps_en_to_english(tmp_path, tiny_model_dir):
    import datasets

    settings = make_settings(
        tmp_path, tiny_model_dir, VOICES_DIR=_speaker_with_label(tmp_path, "en"), TRAIN_SPEAKERS="english_speaker"
    )
    encoder = SpeechEncoder(settings.TOKENIZER_PATH, "cpu")
    (report,) = prepare_dataset(settings, encoder=encoder, report=lambda _: None)
    assert report.languages == {"english": 3} and report.auto_prefix_languages == []
    train = datasets.load_dataset(settings.DATASET_DIR, name="english_speaker", split="train")
    assert set(train["language"]) == {"english"}


def test_preparation_refuses_xx_before_any_encoding(tmp_path, tiny_model_dir):
    settings = make_settings(
        tmp_path, tiny_model_dir, VOICES_DIR=_speaker_with_label(tmp_path, "xx"), TRAIN_SPEAKERS="english_speaker"
    )
    encoder = SpeechEncoder(settings.TOKENIZER_PATH, "cpu")
    with pytest.raises(PreparationError, match=r"speaker english_speaker: language 'xx' .*auto, chinese, english"):
        prepare_dataset(settings, encoder=encoder, report=lambda _: None)
    assert encoder.clips_encoded == 0
