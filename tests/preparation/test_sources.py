import json

import pytest
from conftest import speechlike, write_wav

from finetuning.preparation.sources import SourceError, detect_format, read_source


def test_jsonl_with_audio_and_optional_fields(tmp_path):
    write_wav(tmp_path / "a.wav", speechlike(1.0))
    write_wav(tmp_path / "ref.wav", speechlike(2.0))
    rows = [
        {"audio": "a.wav", "text": "one", "language": "english", "split": "valid", "ref_audio": "ref.wav"},
        {"audio": "missing.wav", "text": "two", "id": "custom"},
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\nnot json\n")
    items = list(read_source(str(tmp_path / "data.jsonl"), None, "spk"))
    assert [i.id for i in items[:2]] == ["a", "custom"]
    assert items[0].audio == tmp_path / "a.wav"
    assert items[0].language == "english" and items[0].split == "validation"
    assert items[0].reference_audio == [tmp_path / "ref.wav"]
    assert items[2].audio is None and items[2].text == ""  # a broken line is kept as a rejectable item


def test_seed_004_jsonl_uses_audio_path(tmp_path):
    write_wav(tmp_path / "x.wav", speechlike(1.0))
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "hello", "audio_path": "x.wav"}) + "\n")
    (item,) = read_source(str(tmp_path / "train.jsonl"), "jsonl", "spk")
    assert item.audio == tmp_path / "x.wav" and item.text == "hello"


@pytest.mark.parametrize(
    ("name", "line"), [("metadata.csv", "c1|Raw text|Normalised text"), ("metadata.tsv", "c1\tRaw")]
)
def test_ljspeech_folder(tmp_path, name, line):
    write_wav(tmp_path / "wavs" / "c1.wav", speechlike(1.0))
    (tmp_path / name).write_text(line + "\n")
    assert detect_format(str(tmp_path)) == "ljspeech"
    (item,) = read_source(str(tmp_path), None, "spk")
    assert item.id == "c1" and item.audio == tmp_path / "wavs" / "c1.wav"
    assert item.text == ("Normalised text" if name.endswith("csv") else "Raw")


def test_chatml_assistant_turns_become_samples(tmp_path):
    write_wav(tmp_path / "ref.wav", speechlike(2.0))
    write_wav(tmp_path / "target.wav", speechlike(1.5))

    def conversation(speaker):
        return {
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Say it"},
                        {"type": "audio", "audio_url": "ref.wav"},
                    ],
                },
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "The answer."},
                        {"type": "audio", "audio_url": "target.wav"},
                    ],
                },
            ],
            "speaker": speaker,
        }

    (tmp_path / "chat.json").write_text(json.dumps([conversation("spk"), conversation("other")]))
    items = list(read_source(str(tmp_path / "chat.json"), None, "spk"))
    assert len(items) == 1
    assert items[0].text == "The answer." and items[0].audio == tmp_path / "target.wav"
    assert items[0].reference_audio == [tmp_path / "ref.wav"]


def test_hf_dataset_keeps_splits_and_filters_speaker(tmp_path):
    import datasets

    def split(rows):
        return datasets.Dataset.from_dict(
            {
                "audio": [str(write_wav(tmp_path / f"{r[0]}.wav", speechlike(1.0))) for r in rows],
                "text": [r[1] for r in rows],
                "speaker": [r[2] for r in rows],
            }
        ).cast_column("audio", datasets.Audio(sampling_rate=24000))

    dd = datasets.DatasetDict(
        {"train": split([("t1", "one", "spk"), ("t2", "two", "other")]), "validation": split([("v1", "three", "spk")])}
    )
    dd.save_to_disk(str(tmp_path / "hf"))
    items = list(read_source(str(tmp_path / "hf"), None, "spk"))
    assert [(i.text, i.split) for i in items] == [("one", "train"), ("three", "validation")]
    assert all(i.audio is not None for i in items)


def test_unknown_format_and_bad_split_are_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="format"):
        list(read_source(str(tmp_path / "x.txt"), None, "spk"))
    (tmp_path / "d.jsonl").write_text(json.dumps({"audio": "a.wav", "text": "t", "split": "holdout"}) + "\n")
    with pytest.raises(SourceError, match="holdout"):
        list(read_source(str(tmp_path / "d.jsonl"), None, "spk"))


def test_paths_leaving_the_source_folder_are_rejected_unless_absolute(tmp_path):
    outside = write_wav(tmp_path / "outside.wav", speechlike(1.0))
    write_wav(tmp_path / "src" / "in.wav", speechlike(1.0))
    rows = [
        {"audio": "in.wav", "text": "a"},
        {"audio": "../outside.wav", "text": "b"},
        {"audio": str(outside), "text": "c"},
    ]
    (tmp_path / "src" / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    inside, leaving, absolute = read_source(str(tmp_path / "src" / "data.jsonl"), None, "spk")
    assert inside.audio == tmp_path / "src" / "in.wav" and inside.problem is None
    assert leaving.problem == "outside_source" and leaving.audio is None
    assert absolute.audio == outside and absolute.problem is None
    chat = [{"messages": [{"role": "assistant", "content": [{"type": "audio", "audio_url": "../outside.wav"}]}]}]
    (tmp_path / "src" / "chat.json").write_text(json.dumps(chat))
    (item,) = read_source(str(tmp_path / "src" / "chat.json"), None, "spk")
    assert item.problem == "outside_source"


def test_ljspeech_line_that_is_not_utf8_is_rejected_alone(tmp_path):
    write_wav(tmp_path / "wavs" / "c1.wav", speechlike(1.0))
    (tmp_path / "metadata.csv").write_bytes(b"c0|caf\xe9\nc1|fine\n")
    bad, good = read_source(str(tmp_path), None, "spk")
    assert bad.problem == "bad_encoding" and bad.origin.endswith("metadata.csv:1")
    assert good.id == "c1" and good.text == "fine" and good.problem is None


def test_hf_rows_name_no_file_outside_their_folder_even_through_a_link(tmp_path):
    import datasets

    outside = write_wav(tmp_path / "outside.wav", speechlike(1.0))
    folder = tmp_path / "hf"
    names = ["in.wav", "../outside.wav", str(outside), "link.wav", str(folder / "in.wav")]
    datasets.Dataset.from_dict({"audio": names, "text": list("abcde")}).save_to_disk(str(folder))
    write_wav(folder / "in.wav", speechlike(1.0))
    (folder / "link.wav").symlink_to(outside)
    items = list(read_source(str(folder), None, "spk"))
    assert [(i.problem, i.audio) for i in items] == [
        (None, folder / "in.wav"),
        ("outside_source", None),
        ("outside_source", None),
        ("outside_source", None),
        (None, folder / "in.wav"),
    ]


def test_each_format_reads_an_instruction_and_the_manifest_maps_labels(tmp_path):
    """jsonl field, LJSpeech field index, ChatML user turn, 🤗 column; a label map and a speaker-wide default."""
    import datasets

    from finetuning.preparation.sources import Instructions

    write_wav(tmp_path / "a.wav", speechlike(1.0))
    rows = [{"audio": "a.wav", "text": "one", "emotion": "angry"}, {"audio": "a.wav", "text": "two", "emotion": ""}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = list(read_source(str(tmp_path / "data.jsonl"), None, "spk", instruct_column="emotion"))
    assert [i.instruct for i in items] == ["angry", ""]
    spec = Instructions.from_entry("spk", {"instruct_column": "emotion", "instructions": {"angry": "Shout."}})
    assert [spec.resolve(i.instruct) for i in items] == ["Shout.", ""]
    spec = Instructions.from_entry("spk", {"instructions": {"angry": "Shout."}, "instruct": "Calmly."})
    assert [spec.resolve(v) for v in ("angry", "Whisper.", "")] == ["Shout.", "Whisper.", "Calmly."]
    assert Instructions.from_entry("spk", {"instruct_column": ""}).resolve("Whisper.") == ""
    with pytest.raises(SourceError, match="instructions"):
        Instructions.from_entry("spk", {"instructions": ["angry"]})

    lj = tmp_path / "lj"
    write_wav(lj / "wavs" / "c1.wav", speechlike(1.0))
    (lj / "metadata.csv").write_text("c1|Raw text|raw text|Speak slowly.\n")
    (item,) = read_source(str(lj), "ljspeech", "spk", instruct_column="3")
    assert (item.text, item.instruct) == ("Raw text", "Speak slowly.")
    (item,) = read_source(str(lj), "ljspeech", "spk")  # no field index: no instruction
    assert item.instruct == ""

    user = {"role": "user", "content": [{"type": "text", "text": "Whisper it."}]}
    answer = {"role": "assistant", "content": [{"type": "text", "text": "Hi."}, {"type": "audio", "audio": "a.wav"}]}
    (tmp_path / "chat.json").write_text(json.dumps([{"messages": [user, answer]}]))
    (item,) = read_source(str(tmp_path / "chat.json"), None, "spk")
    assert (item.text, item.instruct) == ("Hi.", "Whisper it.")

    audio = {"bytes": (tmp_path / "a.wav").read_bytes(), "path": None}
    columns = {"audio": [audio], "text": ["one"], "instruct": ["Happily."]}
    datasets.Dataset.from_dict(columns).save_to_disk(str(tmp_path / "hf"))
    (item,) = read_source(str(tmp_path / "hf"), "hf", "spk")
    assert item.instruct == "Happily."
