"""What replay costs the new speaker and saves the preset speakers, at several REPLAY_FRACTION values.

The scenario of ``tests/training/test_custom_voice_init.py``: a tiny CustomVoice init (a tiny Base model fine-tuned
until its one preset speaker says three sentences, exported), then a new speaker fine-tuned from it on its own
recordings of the same three sentences, once per replay fraction, same steps and seed. For each fraction, through
stock greedy ``generate_custom_voice`` (language left out, non-streaming: the call trained):

- new speaker: utterances whose codebook 0 comes back exactly (incl. EOS), share of all tokens equal, smallest
  teacher-forced margins (codebook 0 incl. EOS, sub-talker) in logits;
- preset speaker: probe texts whose whole output (16 codebooks) is identical to the init's, share of tokens equal,
  smallest teacher-forced margins of the init's output in the fine-tuned model.

Prints JSON.

    uv run python bench/replay_tradeoff.py [--fractions 0,0.25,0.5] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "training")]


def smallest_margins(model, rows) -> dict[str, float]:
    from test_train import teacher_forced_margins

    codec0, sub = [], []
    for row in rows:
        c, s = teacher_forced_margins(model.model, model.processor.tokenizer, row, "non_streaming", None)
        codec0.append(float(c.min()))
        sub.append(float(s.min()))
    return {"codec0": round(min(codec0), 2), "sub_talker": round(min(sub), 2)}


def measure(export_dir: Path, settings, texts: list[str], before: list[torch.Tensor]) -> dict:
    import qwen_tts
    from test_custom_voice_init import NEW, PRESET
    from test_train import _compare, _stock_codes

    from finetuning.training.data import load_split

    model = qwen_tts.Qwen3TTSModel.from_pretrained(str(export_dir), dtype=torch.float32)
    new_rows = [
        {**row, "audio_codes": torch.tensor(np.asarray(row["audio_codes"]), dtype=torch.long)}
        for row in load_split(settings, NEW, "train", ["speaker", "text", "language", "audio_codes"])
    ]
    exact, shares = 0, []
    for row in new_rows:
        generated = _stock_codes(model, NEW, row["text"], row["audio_codes"].shape[0] + 10, None, True)
        first_equal, share = _compare(generated, row["audio_codes"])
        exact, shares = exact + first_equal, shares + [share]
    identical, preset_shares = 0, []
    for text, old in zip(texts, before, strict=True):
        new = _stock_codes(model, PRESET, text, 60, None, True)
        identical += old.shape == new.shape and torch.equal(old, new)
        preset_shares.append(_compare(new, old)[1])
    preset_rows = [{"speaker": PRESET, "text": t, "audio_codes": c} for t, c in zip(texts, before, strict=True)]
    return {
        "new_speaker": {
            "codebook0_exact": f"{exact}/{len(new_rows)}",
            "token_share": round(float(np.mean(shares)), 3),
            "margins": smallest_margins(model, new_rows),
        },
        "preset": {
            "identical": f"{identical}/{len(texts)}",
            "token_share": round(float(np.mean(preset_shares)), 3),
            "margins_of_init_output": smallest_margins(model, preset_rows),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", default="0,0.25,0.5", help="REPLAY_FRACTION values, comma-separated")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of the init and of each fine-tune")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from conftest import discriminative_copy
    from test_custom_voice_init import NEW, PRESET, PROBE_TEXTS, _preset_codes, _settings, _voices
    from test_train import XVECTOR_SCALE

    from finetuning.preparation.prepare import prepare_dataset
    from finetuning.tiny_model import build_tiny_model
    from finetuning.training.loop import train

    report = {"steps": args.steps, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        voices = _voices(root / "voices")
        tiny = build_tiny_model(root / "tiny", layout="equal", seed=0)
        base = discriminative_copy(tiny, sorted(voices.glob("*/*.wav")), root / "base", XVECTOR_SCALE)
        prepare_dataset(_settings(root, base, "prepare", f"{PRESET},{NEW}", 1), report=lambda _: None)
        init = train(_settings(root, base, "init", PRESET, args.steps, REPORT_TO="none"))
        texts = [json.loads(line)["text"] for line in (voices / PRESET / "metadata.jsonl").read_text().splitlines()]
        before = _preset_codes(init.export_dir, texts[:PROBE_TEXTS], 60)
        for fraction in (float(f) for f in args.fractions.split(",")):
            settings = _settings(
                root,
                init.export_dir,
                f"replay_{fraction}",
                NEW,
                args.steps,
                SPEAKER_ENCODER_PATH=base,
                REPLAY_SAMPLES=PROBE_TEXTS,
                REPLAY_FRACTION=fraction,
                REPORT_TO="none",
            )
            start = time.perf_counter()
            result = train(settings)
            seconds = time.perf_counter() - start
            report["runs"][str(fraction)] = {
                "train_s": round(seconds, 1),
                **measure(result.export_dir, settings, texts, before),
            }
            print(json.dumps({str(fraction): report["runs"][str(fraction)]}), file=sys.stderr)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
