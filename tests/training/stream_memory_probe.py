"""Subprocess of the streaming memory test: load one epoch of training data both ways; print the peak resident
memory each way added (JSON).

    python stream_memory_probe.py ENV_FILE map|stream

Linux only: the peak (VmHWM) is reset through /proc/self/clear_refs before each measurement, so each number is
what that way of loading the data costs above the process as it was (imports and tokenizer already loaded).
One way per process, so neither reuses memory the other freed. Streaming runs once to warm up, then is measured,
keeping only batch ids; map-style holds every example, as training does.
"""

import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from transformers import AutoTokenizer  # noqa: E402

from finetuning.settings import load_settings  # noqa: E402
from finetuning.training.data import load_examples  # noqa: E402
from finetuning.training.streaming import StreamingBatches  # noqa: E402

RESET_PEAK = "5"  # /proc/self/clear_refs: reset the peak resident set size to the current one


def memory_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(load) -> tuple[list[str], float]:
    """(ids loaded, MB the peak resident set rose above the resident set before ``load``)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text(RESET_PEAK)
    before = memory_kb("VmRSS")
    ids = load()
    return ids, (memory_kb("VmHWM") - before) / 1024


def main() -> None:
    settings = load_settings(sys.argv[1], environ={})
    tokenizer = AutoTokenizer.from_pretrained(settings.INIT_MODEL_PATH)
    config = json.loads((Path(settings.INIT_MODEL_PATH) / "config.json").read_text())["talker_config"]
    talker_config = type("TalkerConfig", (), config)
    import datasets

    datasets.disable_progress_bars()
    held = []

    def stream() -> list[str]:
        return [i for batch in StreamingBatches(settings, tokenizer, talker_config) for i in batch["id"]]

    def map_style() -> list[str]:
        held.extend(load_examples(settings, tokenizer, "train", streaming=False)[0])
        return [e.id for e in held]

    if sys.argv[2] == "stream":
        measure(stream)  # warm-up: first-use allocations of the libraries are not the data's
    ids, peak_mb = measure(stream if sys.argv[2] == "stream" else map_style)
    print(json.dumps({"ids": ids, "peak_mb": peak_mb}))


if __name__ == "__main__":
    main()
