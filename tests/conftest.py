"""Shared fixtures: tiny real-architecture models (built once per test session) and audio helpers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Tiny models: one thread per process is faster than two competing ones, and subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO_ROOT = Path(__file__).resolve().parents[1]
VOICES_DIR = REPO_ROOT / "voices"
FIXTURES_DIR = REPO_ROOT / "tests" / "fixtures"


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Both tiny layouts, built once per session: {"equal": dir, "wide_text": dir}."""
    from finetuning.tiny_model import LAYOUTS, build_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    return {layout: build_tiny_model(root / layout, layout=layout, seed=0) for layout in LAYOUTS}


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs["equal"]


def subprocess_env() -> dict[str, str]:
    """The environment for a command run as a subprocess: offline, one thread, and none of the caller's settings
    (an environment variable would override the test's own ``.env``)."""
    from finetuning.settings import FIELDS

    env = {key: value for key, value in os.environ.items() if key not in FIELDS}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    return env


def prepare_small_dataset(tmp_path_factory, name: str, model_dir: Path) -> Path:
    """A new folder with the bundled speakers prepared (4 clips each, no validation) in ``dataset/``."""
    from finetuning.preparation.prepare import prepare_dataset

    root = tmp_path_factory.mktemp(name)
    prepare_dataset(make_settings(root, model_dir, VALIDATION_FRACTION=0.0), max_samples=4, report=lambda _: None)
    return root


def write_env_file(root: Path, model_dir: Path, name: str, values: dict) -> Path:
    """``root/<name>.env`` for a command run on the tiny model and ``root``'s prepared dataset, writing to
    ``root/<name>``; ``values`` add or override settings."""
    paths = {
        "INIT_MODEL_PATH": model_dir,
        "TOKENIZER_PATH": model_dir / "speech_tokenizer",
        "VOICES_DIR": VOICES_DIR,
        "DATASET_DIR": root / "dataset",
        "OUTPUT_DIR": root / name,
        "DEVICE": "cpu",
    }
    path = root / f"{name}.env"
    path.write_text("".join(f"{k}={v}\n" for k, v in {**paths, **values}.items()))
    return path


def free_port() -> int:
    """A TCP port nobody listens on now, for a multi-process launch's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_stock_loadable_export(export_dir: Path, base_dir: Path, speakers) -> None:
    """``export_dir`` loads with stock ``qwen_tts.Qwen3TTSModel.from_pretrained``, lists exactly ``speakers`` and
    holds trained weights: full shapes (gathered from every shard), not the base model's, exactly as loaded."""
    import qwen_tts
    from safetensors.torch import load_file

    model = qwen_tts.Qwen3TTSModel.from_pretrained(str(export_dir), dtype=torch.float32)
    assert sorted(model.get_supported_speakers()) == sorted(speakers)
    trained = load_file(str(Path(export_dir) / "model.safetensors"))
    base = load_file(str(Path(base_dir) / "model.safetensors"))
    loaded = model.model.state_dict()
    for key in ("talker.model.layers.0.mlp.up_proj.weight", "talker.code_predictor.model.layers.0.mlp.up_proj.weight"):
        assert trained[key].shape == base[key].shape, key
        assert not torch.equal(trained[key], base[key]), key
        torch.testing.assert_close(loaded[key], trained[key])


def run_killed(target, sites: list[tuple[object, str]], kill_at: int | None = None) -> tuple[bool, list[str]]:
    """Run ``target()`` in a forked copy of this process (everything already imported: no start-up cost) whose
    ``sites`` (``(module or class, function name)``) count their calls together; at call number ``kill_at`` the
    child SIGKILLs itself before the call runs (``None``: never). Returns (killed, the names of the sites called
    in order, up to the kill); a child that raised fails the caller's test."""
    import signal

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: patch, run, and leave without running the parent's exit handlers
        os.close(read_end)

        def counting(name, function):
            def call(*args, **kwargs):
                os.write(write_end, f"{name}\n".encode())  # reaches the parent even if this call is the kill
                if kill_at is not None and kill_at == counting.calls + 1:
                    os.kill(os.getpid(), signal.SIGKILL)
                counting.calls += 1
                return function(*args, **kwargs)

            return call

        counting.calls = 0
        code = 0
        try:
            for owner, name in sites:
                setattr(owner, name, counting(name, getattr(owner, name)))
            target()
        except BaseException:  # noqa: BLE001 - reported through the exit code
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        trace = pipe.read().split()
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert killed or os.WEXITSTATUS(status) == 0, "the forked run failed (its traceback is above)"
    return killed, trace


def write_wav(path: Path, samples, sample_rate: int = 24000) -> Path:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples, sample_rate)
    return path


def speechlike(duration_s: float, sample_rate: int = 24000, seed: int = 0, level: float = 0.3):
    """A voiced-sounding test signal: a 140 Hz harmonic tone with a 4 Hz syllable envelope and a little noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(int(duration_s * sample_rate)) / sample_rate
    tone = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 6))
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4 * t)
    signal = tone * envelope + 0.02 * rng.standard_normal(t.size)
    return (level * signal / np.max(np.abs(signal))).astype("float32")


def make_settings(tmp_path: Path, tiny_model_dir: Path, **overrides):
    """Settings for a test: no .env, no environment, tiny speech tokenizer, everything under tmp_path."""
    from finetuning.settings import load_settings

    values = {
        "VOICES_DIR": str(VOICES_DIR),
        "DATASET_DIR": str(tmp_path / "dataset"),
        "TOKENIZER_PATH": str(tiny_model_dir / "speech_tokenizer"),
        "INIT_MODEL_PATH": str(tiny_model_dir),
        "OUTPUT_DIR": str(tmp_path / "run"),
        "DEVICE": "cpu",
        "MIXED_PRECISION": "no",
        "DATALOADER_WORKERS": 0,
    }
    values.update({k: str(v) for k, v in overrides.items()})
    return load_settings(None, overrides=values, environ={})


def discriminative_copy(model_dir: Path, clips: list[Path], out_dir: Path, scale: float = 10.0) -> Path:
    """A copy of the tiny model whose random speaker encoder tells the training voices apart.

    A random encoder maps every clip to nearly one x-vector (the two voices at cosine ~0.99: pooled statistics
    of positive activations share one large component), where a trained one separates voices. Centring its last
    layer on the clips' pooled statistics (and scaling it back to the x-vectors' usual norm) keeps the real
    architecture and leaves clips of one voice closer than clips of two voices, as a trained encoder would.
    ``scale`` multiplies the centred layer: at 10 the x-vectors keep about the random ones' norm (~0.3)."""
    import shutil

    import qwen_tts
    import soundfile as sf
    from safetensors.torch import load_file, save_file

    from finetuning.preparation.audio import resample

    shutil.copytree(model_dir, out_dir)
    model = qwen_tts.Qwen3TTSModel.from_pretrained(str(out_dir), dtype=torch.float32).model
    encoder = model.speaker_encoder
    pooled = []
    handle = encoder.asp.register_forward_hook(lambda module, inputs, output: pooled.append(output[..., 0]))
    for path in clips:
        audio, sample_rate = sf.read(path, dtype="float32")
        model.extract_speaker_embedding(resample(audio, sample_rate, 24000), 24000)
    handle.remove()
    mean = torch.cat(pooled).mean(dim=0)  # (2C,)
    state = load_file(str(out_dir / "model.safetensors"))
    weight, bias = state["speaker_encoder.fc.weight"], state["speaker_encoder.fc.bias"]  # (D, 2C, 1), (D,)
    state["speaker_encoder.fc.bias"] = scale * (bias - weight[..., 0] @ mean)
    state["speaker_encoder.fc.weight"] = scale * weight
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


def shift_labels_once_more(inputs):
    """The official recipe's double label shift (upstream issue #179), for tests that show it fails: first-codebook
    labels moved one more position left, so each position learns the code one frame further ahead.

    ``inputs`` is a ``finetuning.training.step.TalkerInputs``; returns a copy with shifted (B, L) labels and
    labelled positions.
    """
    import dataclasses

    from finetuning.training.step import IGNORE_INDEX

    labels = inputs.labels
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    return dataclasses.replace(inputs, labels=shifted, label_position=inputs.label_position - 1)


_MARGINS: dict[str, dict[str, float]] = {}


class MarginLog(dict):
    """Smallest teacher-forced margins per overfit case; each entry also rides on the test's report, so the run's
    summary has them when the tests run in worker processes (pytest-xdist)."""

    def __init__(self, node):
        super().__init__()
        self.node = node

    def __setitem__(self, case, margins):
        super().__setitem__(case, margins)
        _MARGINS[case] = margins
        self.node.user_properties.append(("margins", {case: margins}))


@pytest.fixture
def margin_log(request) -> MarginLog:
    """Smallest teacher-forced margins per overfit case, printed at the end of the run (CPU kernels differ)."""
    return MarginLog(request.node)


def pytest_addoption(parser):
    parser.addoption(
        "--kill-every-site",
        action="store_true",
        help="tests/test_kill_anywhere.py: also kill at every write call of every phase (minutes)",
    )


def pytest_runtest_logreport(report):
    for name, value in report.user_properties:
        if name == "margins":
            _MARGINS.update(value)


def pytest_terminal_summary(terminalreporter):
    if _MARGINS:
        capability = torch.backends.cpu.get_cpu_capability()
        terminalreporter.section(f"smallest teacher-forced margins (logits; torch CPU capability {capability})")
        for case, margins in sorted(_MARGINS.items()):
            terminalreporter.write_line(f"{case}: " + ", ".join(f"{k} {v:.2f}" for k, v in margins.items()))
