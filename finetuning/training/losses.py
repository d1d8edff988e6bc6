"""Auxiliary losses that reach the talker through audio: mel reconstruction, voice consistency, prosody.

The talker predicts discrete codes, so there is no audio to compare until the codes are decoded. This module
builds a differentiable path from the step's logits to a waveform and scores that waveform.

Soft path (chosen over a straight-through estimator). For each codebook ``k`` of a frame the talker gives a
distribution ``p_k`` over the codec's ``V`` = 2048 codes: softmax of the codec-0 logits restricted to ids
``0..V-1`` (control tokens and speaker rows are dropped) and softmax of the code predictor's logits for codebooks
2..16 (teacher-forced on the target codes, exactly as the step computes them). The frozen 12 Hz decoder's
quantizer looks codes up as ``sum_k out_proj_g(k)(project_out_k(E_k[c_k]))`` with one group for the semantic
first codebook and one for the 15 residual ones; every map after the table is affine, so replacing ``E_k[c_k]``
by ``p_k @ E_k`` gives the expected quantizer output, and one-hot ``p`` reproduces ``decoder(codes)`` exactly
(tested). The rest of the decoder (pre-conv, transformer, upsampling, vocoder, clamp) runs unchanged. Unlike a
straight-through estimator, the forward pass sees what the talker currently believes (a blurry sound where it
is unsure), so every loss is ~0 only when the prediction is confidently right; gradients reach every logit.

Cost is bounded by decoding one random crop of at most ``crop_frames`` consecutive frames per utterance
(1920 samples per frame at 24 kHz), and only every ``every_n_steps``-th training call.

Targets. The batch holds codes, not the recorded audio, so every target is the frozen decoder's output for the
target codes of the same crop (no gradient): the best waveform the talker can reach, since perfect codes decode
to exactly it, and free of the codec's own reconstruction error that the talker cannot remove.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from finetuning.constants import SAMPLE_RATE

MEL_RECONSTRUCTION = "mel_reconstruction"
VOICE_CONSISTENCY = "voice_consistency"
PROSODY = "prosody"
AUX_LOSS_NAMES = (MEL_RECONSTRUCTION, VOICE_CONSISTENCY, PROSODY)
LOG_FLOOR = 1e-5  # floor of mel magnitudes before the log, as the model's own mel front end uses
# (n_fft, hop, n_mels) at 24 kHz: ~21 ms, ~43 ms and ~85 ms windows
MEL_RESOLUTIONS = ((512, 128, 64), (1024, 256, 100), (2048, 512, 128))
# the speaker encoder's front end (``Qwen3TTSForConditionalGeneration.extract_speaker_embedding``)
SPEAKER_MEL = {"n_fft": 1024, "hop": 256, "n_mels": 128, "fmin": 0.0, "fmax": 12_000.0}


def _mel_basis(n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) Slaney-normalised filterbank, the one librosa gives the model's front end."""
    from librosa.filters import mel

    return torch.from_numpy(mel(sr=SAMPLE_RATE, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)).float()


def _log_mel(audio: torch.Tensor, basis: torch.Tensor, window: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """(C, S) float32 audio -> (C, n_mels, frames) natural-log mel magnitudes; reflect-padded by (n_fft - hop) / 2
    and not centred, like ``qwen_tts``'s ``mel_spectrogram`` (so a frame starts every ``hop`` samples)."""
    padding = (n_fft - hop) // 2
    audio = F.pad(audio[:, None], (padding, padding), mode="reflect")[:, 0]
    spec = torch.stft(audio, n_fft, hop_length=hop, window=window, center=False, return_complex=True)
    magnitude = torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1) + 1e-9)  # eps keeps sqrt's gradient finite
    return torch.log(torch.clamp(basis @ magnitude, min=LOG_FLOOR))


class SoftCodecDecoder(nn.Module):
    """The frozen 12 Hz speech-tokenizer decoder, fed with code probabilities instead of code ids.

    ``forward(probs)`` with probs (C, L, K, V) (C crops, L frames, K = 16 codebooks, V = 2048 codes, each
    row summing to 1) returns (C, L * samples_per_frame) audio in [-1, 1] at 24 kHz with gradient into probs.
    ``decode_codes(codes)`` is the decoder itself on (C, L, K) long codes, without gradient.
    """

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder
        self.decoder.requires_grad_(False)
        self.decoder.eval()
        self.num_codebooks = int(decoder.config.num_quantizers)
        self.codebook_size = int(decoder.config.codebook_size)
        self.samples_per_frame = int(decoder.total_upsample)

    def train(self, mode: bool = True) -> SoftCodecDecoder:
        super().train(mode)
        self.decoder.eval()  # frozen: never dropout, whatever mode the training step is in
        return self

    def _groups(self):
        """(residual quantizer, first codebook index) for the semantic group and the acoustic group."""
        quantizer = self.decoder.quantizer
        return ((quantizer.rvq_first, 0), (quantizer.rvq_rest, quantizer.n_q_semantic))

    def embed(self, probs: torch.Tensor) -> torch.Tensor:
        """(C, L, K, V) probabilities -> (C, codebook_dim, L): the expected ``quantizer.decode`` output."""
        hidden = 0
        for rvq, first in self._groups():
            tables = []
            for layer in rvq.vq.layers:
                book = layer._codebook
                vectors = book.embedding_sum / book.cluster_usage.clamp(min=book.epsilon)[:, None]  # (V, d)
                tables.append(layer.project_out(vectors))  # (V, dim)
            tables = torch.stack(tables)  # (Kg, V, dim)
            group = probs[:, :, first : first + len(tables)].to(tables.dtype)  # (C, L, Kg, V)
            summed = torch.einsum("clkv,kvd->cdl", group, tables)  # (C, dim, L)
            hidden = hidden + rvq.output_proj(summed)  # (C, codebook_dim, L)
        return hidden

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        if probs.shape[-2:] != (self.num_codebooks, self.codebook_size):
            raise ValueError(
                f"expected probabilities (..., {self.num_codebooks}, {self.codebook_size}), got {tuple(probs.shape)}"
            )
        decoder = self.decoder
        # Qwen3TTSTokenizerV2Decoder.forward after its quantizer.decode, unchanged
        hidden = decoder.pre_conv(self.embed(probs)).transpose(1, 2)  # (C, L, latent)
        hidden = decoder.pre_transformer(inputs_embeds=hidden).last_hidden_state.permute(0, 2, 1)
        for blocks in decoder.upsample:
            for block in blocks:
                hidden = block(hidden)
        for block in decoder.decoder:
            hidden = block(hidden)
        return hidden.clamp(min=-1, max=1)[:, 0]  # (C, S)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(C, L, K) long codes -> (C, L * samples_per_frame) audio, no gradient."""
        return self.decoder(codes.transpose(1, 2))[:, 0]


class MelReconstructionLoss(nn.Module):
    """Multi-resolution log-mel L1 distance between two waveforms.

    forward(audio (C, S), target (C, S)) -> scalar: the mean over resolutions of the mean absolute difference of
    natural-log mel magnitudes (floor 1e-5), i.e. an average log-ratio: 0.1 ~ a 10 % magnitude error per
    mel bin. Resolutions: ``MEL_RESOLUTIONS`` (n_fft, hop, n_mels) at 24 kHz.
    """

    def __init__(self, resolutions: tuple[tuple[int, int, int], ...] = MEL_RESOLUTIONS):
        super().__init__()
        self.resolutions = tuple(resolutions)
        for i, (n_fft, _, n_mels) in enumerate(self.resolutions):
            self.register_buffer(f"basis_{i}", _mel_basis(n_fft, n_mels), persistent=False)
            self.register_buffer(f"window_{i}", torch.hann_window(n_fft), persistent=False)

    def forward(self, audio: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        audio, target = audio.float(), target.float()
        distances = []
        for i, (n_fft, hop, _) in enumerate(self.resolutions):
            basis, window = getattr(self, f"basis_{i}"), getattr(self, f"window_{i}")
            predicted = _log_mel(audio, basis, window, n_fft, hop)  # (C, n_mels, frames)
            wanted = _log_mel(target, basis, window, n_fft, hop)
            distances.append((predicted - wanted).abs().mean())
        return torch.stack(distances).mean()


class VoiceConsistencyLoss(nn.Module):
    """1 - cosine between the frozen speaker encoder's x-vectors of a predicted and a target waveform.

    The target is the decoded target codes of the same crop, like the other losses' targets, not the speaker's
    mean x-vector over whole reference clips: a ~1 s crop of perfect codes does not embed to that mean, so a
    mean target would pull the talker away from its own training data (measured on the overfit test: the
    smallest sub-talker margin fell from about +6 to -0.15 logits and greedy decoding diverged).

    ``embed(audio (C, S)) -> (C, D)`` is ``extract_speaker_embedding`` made differentiable: the same 128-bin
    log-mel front end (n_fft 1024, hop 256, 0-12 kHz), batched, without ``inference_mode``. The encoder is the
    model's own module (it stays part of the model); it is frozen here and kept in eval mode.
    forward(audio (C, S), target (C, S)) -> scalar in [0, 2], mean over crops; no gradient into the target.
    """

    def __init__(self, speaker_encoder: nn.Module):
        super().__init__()
        self.speaker_encoder = speaker_encoder
        self.speaker_encoder.requires_grad_(False)
        self.speaker_encoder.eval()
        cfg = SPEAKER_MEL
        self.register_buffer(
            "basis", _mel_basis(cfg["n_fft"], cfg["n_mels"], cfg["fmin"], cfg["fmax"]), persistent=False
        )
        self.register_buffer("window", torch.hann_window(cfg["n_fft"]), persistent=False)

    def train(self, mode: bool = True) -> VoiceConsistencyLoss:
        super().train(mode)
        self.speaker_encoder.eval()
        return self

    def mel(self, audio: torch.Tensor) -> torch.Tensor:
        """(C, S) audio -> (C, frames, 128) log-mel, as the speaker encoder expects it."""
        return _log_mel(audio.float(), self.basis, self.window, SPEAKER_MEL["n_fft"], SPEAKER_MEL["hop"]).transpose(
            1, 2
        )

    def embed(self, audio: torch.Tensor) -> torch.Tensor:
        dtype = next(self.speaker_encoder.parameters()).dtype
        return self.speaker_encoder(self.mel(audio).to(dtype))  # (C, D)

    def forward(self, audio: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        embeds = self.embed(audio).float()
        with torch.no_grad():
            wanted = self.embed(target).float()
        return (1 - F.cosine_similarity(embeds, wanted, dim=-1)).mean()


class ProsodyLoss(nn.Module):
    """Distance between the energy and pitch contours of two waveforms, both in natural-log units.

    Frames of ``frame_length`` samples every ``hop`` samples (1024 / 256 at 24 kHz: 43 ms every 10.7 ms).
      * energy: log RMS per frame (floor 1e-4 RMS); the term is the mean |difference|, so 0.69 = a factor 2
        (6 dB) everywhere.
      * pitch: a differentiable autocorrelation pitch proxy. Per Hann-windowed frame, the normalised
        autocorrelation divided by the window's own (Boersma's correction) is scored over lags for
        ``fmin..fmax`` Hz, minus ``octave_cost`` per octave below ``fmax`` (against subharmonic picks); a
        softmax over lags at ``temperature`` gives an expected log period, and log F0 = log(sr) - that. The term
        is the mean |log F0 difference| weighted by the target's voicing (its best normalised autocorrelation,
        clipped at 0, no gradient): 0.69 = one octave, 0.058 = one semitone. Silent or noisy target frames weigh
        ~0.
    forward(audio (C, S), target (C, S)) -> scalar = energy term + pitch term.
    """

    def __init__(
        self,
        frame_length: int = 1024,
        hop: int = 256,
        fmin_hz: float = 60.0,
        fmax_hz: float = 400.0,
        temperature: float = 0.02,
        octave_cost: float = 0.1,
    ):
        super().__init__()
        self.frame_length, self.hop, self.temperature = frame_length, hop, temperature
        self.min_lag = math.floor(SAMPLE_RATE / fmax_hz)
        self.max_lag = min(math.ceil(SAMPLE_RATE / fmin_hz), frame_length // 2)
        window = torch.hann_window(frame_length)
        window_ac = self._autocorrelation(window[None])[0]  # (frame_length,)
        lags = torch.arange(self.min_lag, self.max_lag + 1, dtype=torch.float32)
        self.register_buffer("window", window, persistent=False)
        self.register_buffer("window_ac", window_ac[self.min_lag : self.max_lag + 1] / window_ac[0], persistent=False)
        self.register_buffer("log_lags", lags.log(), persistent=False)
        self.register_buffer("octave_penalty", octave_cost * torch.log2(lags / self.min_lag), persistent=False)

    def _autocorrelation(self, frames: torch.Tensor) -> torch.Tensor:
        """(..., W) -> (..., W) linear (not circular) autocorrelation at lags 0..W-1."""
        width = frames.shape[-1]
        spectrum = torch.fft.rfft(frames, n=2 * width)
        return torch.fft.irfft(spectrum.real.pow(2) + spectrum.imag.pow(2), n=2 * width)[..., :width]

    def features(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(C, S) audio -> (log_rms, log_f0, voicing), each (C, frames); log F0 in log-Hz."""
        frames = audio.float().unfold(-1, self.frame_length, self.hop)  # (C, F, W)
        log_rms = 0.5 * torch.log(frames.pow(2).mean(-1) + 1e-8)
        ac = self._autocorrelation(frames * self.window)  # (C, F, W)
        floor = 1e-8 * self.frame_length  # silent frames get ~0 correlation rather than 0 / 0
        normalised = ac[..., self.min_lag : self.max_lag + 1] / (ac[..., :1] + floor) / self.window_ac
        weights = torch.softmax((normalised - self.octave_penalty) / self.temperature, dim=-1)  # (C, F, lags)
        log_f0 = math.log(SAMPLE_RATE) - (weights * self.log_lags).sum(-1)
        voicing = normalised.amax(-1).clamp(min=0)
        return log_rms, log_f0, voicing

    def forward(self, audio: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_rms, log_f0, _ = self.features(audio)
        with torch.no_grad():
            target_rms, target_f0, voicing = self.features(target)
        energy = (log_rms - target_rms).abs().mean()
        pitch = (voicing * (log_f0 - target_f0).abs()).sum() / voicing.sum().clamp(min=1e-6)
        return energy + pitch


class AuxiliaryLosses(nn.Module):
    """Decode random crops of the talker's soft predictions and score them with the losses whose weight is > 0.

    ``forward(out)`` takes a ``training.step.StepOutput`` (its ``frame_codec0_logits (N, V)``,
    ``sub_talker_logits (N, K-1, V_cp)``, ``frame_batch (N,)``, ``frame_codes (N, K)``) and returns
    ``{name: unweighted scalar}`` for each active loss, every one against the decoded target codes; the caller adds
    ``sum(weights[name] * value)``. In training mode the losses run on every ``every_n_steps``-th call (counted
    from the first) and the other calls return ``{}``; on average a loss then adds weight / every_n_steps. In eval
    mode they run on every call, on the centred crop, and the count does not advance.

    Crops: one per utterance, ``min(crop_frames, shortest utterance in the batch)`` consecutive frames of that
    utterance (one length, so all crops decode as one batch), starting at a random frame drawn from a
    ``torch.Generator`` seeded with ``seed``. The decoder's edge (no left context) is the same for the
    prediction and its target, so it cancels in the comparison.

    Raises ValueError for a negative weight, ``every_n_steps`` < 1, ``crop_frames`` < 1, or a voice weight > 0
    without a speaker encoder.
    """

    def __init__(
        self,
        decoder: nn.Module,
        speaker_encoder: nn.Module | None,
        mel_reconstruction_weight: float = 1.0,
        voice_consistency_weight: float = 0.5,
        prosody_weight: float = 0.5,
        every_n_steps: int = 1,
        crop_frames: int = 16,
        seed: int = 0,
    ):
        super().__init__()
        requested = {
            MEL_RECONSTRUCTION: mel_reconstruction_weight,
            VOICE_CONSISTENCY: voice_consistency_weight,
            PROSODY: prosody_weight,
        }
        for name, weight in requested.items():
            if weight < 0:
                raise ValueError(f"auxiliary loss weight {name}={weight} must be >= 0 (0 turns it off)")
        if every_n_steps < 1 or crop_frames < 1:
            raise ValueError(f"every_n_steps ({every_n_steps}) and crop_frames ({crop_frames}) must be >= 1")
        if requested[VOICE_CONSISTENCY] > 0 and speaker_encoder is None:
            raise ValueError("the voice-consistency loss needs the Base model's speaker encoder; set its weight to 0")
        self.weights = {name: float(w) for name, w in requested.items() if w > 0}
        self.every_n_steps = every_n_steps
        self.crop_frames = crop_frames
        self.codec = SoftCodecDecoder(decoder)
        builders = {
            MEL_RECONSTRUCTION: MelReconstructionLoss,
            VOICE_CONSISTENCY: lambda: VoiceConsistencyLoss(speaker_encoder),
            PROSODY: ProsodyLoss,
        }
        self.losses = nn.ModuleDict({name: builders[name]() for name in self.weights})
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        # Training-mode calls so far. Crops depend only on (seed, this count), so a resumed run that restores the
        # count (``finetuning.training.loop``) draws the same crops as an uninterrupted one.
        self.training_calls = 0

    def crop_indices(self, frame_batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) batch row of each frame (rows contiguous, in order) -> (rows (C,), frame indices (C, L))."""
        counts = torch.bincount(frame_batch.cpu())  # (B,)
        starts_of_rows = torch.cumsum(counts, 0) - counts
        rows = torch.nonzero(counts).flatten()  # (C,) utterances with at least one frame
        length = min(self.crop_frames, int(counts[rows].min()))
        room = counts[rows] - length + 1  # (C,) possible crop starts per utterance
        if self.training:
            offsets = (torch.rand(len(rows), generator=self.generator) * room).long()
        else:
            offsets = (room - 1) // 2
        index = starts_of_rows[rows, None] + offsets[:, None] + torch.arange(length)  # (C, L)
        return rows.to(frame_batch.device), index.to(frame_batch.device)

    def forward(self, out) -> dict[str, torch.Tensor]:
        if self.training:
            due = self.training_calls % self.every_n_steps == 0
            self.generator.manual_seed(self.seed * 1_000_003 + self.training_calls)
            self.training_calls += 1
            if not due:
                return {}
        if not self.weights:
            return {}
        codes = out.frame_codes
        if codes.shape[1] != self.codec.num_codebooks:
            raise ValueError(f"frames have {codes.shape[1]} codebooks, the decoder {self.codec.num_codebooks}")
        _, index = self.crop_indices(out.frame_batch)
        size = self.codec.codebook_size
        with torch.autocast(codes.device.type, enabled=False):
            first = out.frame_codec0_logits[index][..., :size].float().softmax(-1)  # (C, L, V)
            rest = out.sub_talker_logits[index][..., :size].float().softmax(-1)  # (C, L, K-1, V)
        audio = self.codec(torch.cat([first[:, :, None], rest], dim=2)).float()  # (C, S)
        target = self.codec.decode_codes(codes[index]).float()  # (C, S)
        with torch.autocast(audio.device.type, enabled=False):  # STFT features in float32
            return {name: loss(audio, target) for name, loss in self.losses.items()}

    def weighted_sum(self, components: dict[str, torch.Tensor]) -> torch.Tensor | float:
        """Σ weight · component over ``components`` (0.0 when empty)."""
        return sum((self.weights[name] * value for name, value in components.items()), 0.0)


def load_codec_decoder(model, model_dir: str | Path) -> nn.Module:
    """A private copy of the 12 Hz speech-tokenizer decoder: from ``model.speech_tokenizer`` when
    ``Qwen3TTSModel.from_pretrained`` loaded one, else from ``<model_dir>/speech_tokenizer``.

    The copy keeps the model's own tokenizer (used by generation) untouched on its device. It is not part of
    ``model``, so ``model.parameters()`` and exports never include it. Raises ValueError for a tokenizer
    without a 12 Hz decoder.
    """
    holder = getattr(model, "speech_tokenizer", None)
    codec = getattr(holder, "model", None)
    if codec is None:
        import qwen_tts

        codec = qwen_tts.Qwen3TTSTokenizer.from_pretrained(str(Path(model_dir) / "speech_tokenizer")).model
        decoder = codec.decoder
    else:
        decoder = copy.deepcopy(codec.decoder)
    if not hasattr(decoder, "quantizer") or not hasattr(decoder.quantizer, "rvq_first"):
        raise ValueError(f"{model_dir}: the auxiliary losses need the 12 Hz speech tokenizer's decoder")
    return decoder.float()


def build_auxiliary_losses(settings, model, model_dir: str | Path, device) -> AuxiliaryLosses | None:
    """The auxiliary losses the settings ask for, on ``device``; None when USE_AUXILIARY_LOSSES is false or
    every weight is 0. The decoder and the speaker encoder are frozen (``requires_grad`` False, eval mode)."""
    weights = (settings.MEL_RECONSTRUCTION_WEIGHT, settings.VOICE_CONSISTENCY_WEIGHT, settings.PROSODY_WEIGHT)
    if not settings.USE_AUXILIARY_LOSSES or not any(w > 0 for w in weights):
        return None
    losses = AuxiliaryLosses(
        load_codec_decoder(model, model_dir),
        model.speaker_encoder,
        mel_reconstruction_weight=settings.MEL_RECONSTRUCTION_WEIGHT,
        voice_consistency_weight=settings.VOICE_CONSISTENCY_WEIGHT,
        prosody_weight=settings.PROSODY_WEIGHT,
        every_n_steps=settings.AUX_LOSS_EVERY_N_STEPS,
        crop_frames=settings.AUX_CROP_FRAMES,
        seed=settings.SEED,
    )
    return losses.to(device)
