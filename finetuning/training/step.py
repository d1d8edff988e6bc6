"""The training step: build the talker's input exactly as stock ``generate`` builds it, then score it.

Reference: ``Qwen3TTSForConditionalGeneration.generate`` in qwen-tts 0.1.1, for a custom-voice speaker
(``generate_custom_voice``). For one utterance with text token ids ``t`` of
``<|im_start|>assistant\\n{text}<|im_end|>\\n<|im_start|>assistant\\n`` (role = t[:3], content = t[3:-5]),
codec prefix ``P`` = [nothink, think_bos, think_eos] (language "auto") or [think, think_bos, lang, think_eos],
speaker embedding ``s``, ``T(x) = text_projection(text_embedding(x))``, ``C(x) = codec_embedding(x)`` and frame
embedding ``F_j = C(code_j0) + sum_k code_predictor_embedding[k-1](code_jk)``, the talker sees:

    role:        T(role)                                              3 positions
    prefix:      P_i + T(tts_pad) ...,  s + T(tts_pad),  C(pad) + T(tts_bos)
    non_streaming (``generate_custom_voice`` default):
                 T(content) + C(pad), T(tts_eos) + C(pad), T(tts_pad) + C(bos),  then F_j + T(tts_pad)
    streaming:   T(content_0) + C(bos),  then F_j + (T(content_{j+1}) | T(tts_eos) | T(tts_pad))

The output at the last prefill position predicts frame 0's first code; the output at frame j's position
predicts frame j+1's first code, and the last frame's position predicts EOS. Labels are therefore the codes
shifted exactly once, and the loss is computed here from the logits (the model's own ``loss_function`` shifts
again, the official recipe's double shift). The code predictor for frame j gets [hidden state at the position
that predicted code_j0, C(code_j0), emb_1(code_j1), ..., emb_14(code_j14)]; its position i predicts code_ji
with ``lm_head[i-1]``, as in generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from finetuning.training.losses import AuxiliaryLosses

LAYOUTS = ("non_streaming", "streaming")
IGNORE_INDEX = -100
ROLE_TOKENS = 3  # "<|im_start|>", "assistant", "\n"
SUFFIX_TOKENS = 5  # "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"


def assistant_text(text: str) -> str:
    """The prompt text ``generate_custom_voice`` tokenizes for one utterance."""
    return f"<|im_start|>assistant\n{text}<|im_end|>\n<|im_start|>assistant\n"


@dataclass
class TalkerInputs:
    """Everything one forward pass needs; B = batch, L = longest sequence, N = frames in the batch, D = width.

    inputs_embeds   (B, L, D) float   talker input, right-padded with zeros
    attention_mask  (B, L)    long    1 for real positions
    labels          (B, L)    long    first-codebook targets (codes + EOS), IGNORE_INDEX elsewhere
    frame_batch     (N,)      long    batch row of each frame
    frame_position  (N,)      long    position whose hidden state predicted that frame's first code
    frame_codes     (N, 16)   long    the frame's codes
    num_labels      int               targets in ``labels`` (counted without a device sync)
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    frame_batch: torch.Tensor
    frame_position: torch.Tensor
    frame_codes: torch.Tensor
    num_labels: int  # real first-codebook targets (codes + EOS per utterance), counted on the host


def codec_prefix_ids(talker_config, language_id: int | None) -> list[int]:
    if language_id is None:
        return [talker_config.codec_nothink_id, talker_config.codec_think_bos_id, talker_config.codec_think_eos_id]
    return [
        talker_config.codec_think_id,
        talker_config.codec_think_bos_id,
        language_id,
        talker_config.codec_think_eos_id,
    ]


def language_id_for(talker_config, language: str | None) -> int | None:
    """The codec language id generation uses for ``language``; None for "auto" and languages the model lacks."""
    if language is None:
        return None
    return talker_config.codec_language_id.get(language.lower())


def sequence_length(talker_config, num_text_tokens: int, num_frames: int, language: str | None, layout: str) -> int:
    """Talker positions ``build_sequence`` makes for one utterance (the padded cost batching budgets for)."""
    prefix = len(codec_prefix_ids(talker_config, language_id_for(talker_config, language))) + 2  # + speaker, pad
    content = num_text_tokens - ROLE_TOKENS - SUFFIX_TOKENS
    text_part = content + 2 if layout == "non_streaming" else 1
    return ROLE_TOKENS + prefix + text_part + num_frames


def frame_embeddings(talker, codes: torch.Tensor) -> torch.Tensor:
    """(..., 16) codes -> (..., D): first codebook through the talker's codec embedding, the rest through the code
    predictor's embeddings, summed (as generate feeds a finished frame back)."""
    total = talker.get_input_embeddings()(codes[..., 0])
    for k, embedding in enumerate(talker.code_predictor.get_input_embeddings(), start=1):
        total = total + embedding(codes[..., k])
    return total


def build_sequence(
    model,
    text_ids: torch.Tensor,
    codes: torch.Tensor,
    speaker_embed: torch.Tensor,
    language_id: int | None,
    layout: str,
) -> tuple[torch.Tensor, int]:
    """One utterance's talker input. text_ids (Lt,) long, codes (T, 16) long, speaker_embed (D,).

    Returns (embeds (Lp + T, D), Lp) where Lp is the prefill length (the positions before the first frame).
    """
    cfg = model.config
    talker = model.talker
    tcfg = cfg.talker_config
    device = text_ids.device

    def text(ids) -> torch.Tensor:
        return talker.text_projection(talker.get_text_embeddings()(torch.as_tensor(ids, device=device)))

    def codec(ids) -> torch.Tensor:
        return talker.get_input_embeddings()(torch.as_tensor(ids, device=device))

    tts_bos, tts_eos, tts_pad = text([cfg.tts_bos_token_id, cfg.tts_eos_token_id, cfg.tts_pad_token_id]).unbind(0)
    role, content = text_ids[:ROLE_TOKENS], text_ids[ROLE_TOKENS:-SUFFIX_TOKENS]
    prefix_ids = codec_prefix_ids(tcfg, language_id)
    codec_prefix = torch.cat(
        [codec(prefix_ids), speaker_embed.view(1, -1).to(tts_pad.dtype), codec([tcfg.codec_pad_id])], dim=0
    )  # (len(P) + 2, D)
    text_prefix = torch.cat([tts_pad.expand(len(prefix_ids) + 1, -1), tts_bos.view(1, -1)], dim=0)
    parts = [text(role), codec_prefix + text_prefix]
    frames = frame_embeddings(talker, codes)  # (T, D)
    if layout == "non_streaming":
        content_embeds = torch.cat([text(content), tts_eos.view(1, -1)], dim=0)
        parts += [
            content_embeds + codec([tcfg.codec_pad_id]),
            (tts_pad + codec([tcfg.codec_bos_id])[0]).view(1, -1),
        ]
        trailing = tts_pad.expand(frames.shape[0], -1)
    elif layout == "streaming":
        parts.append(text(content[:1]) + codec([tcfg.codec_bos_id]))
        trailing_text = torch.cat([text(content[1:]), tts_eos.view(1, -1)], dim=0)
        missing = max(0, frames.shape[0] - trailing_text.shape[0])
        trailing = torch.cat([trailing_text, tts_pad.expand(missing, -1)], dim=0)[: frames.shape[0]]
    else:
        raise ValueError(f"unknown layout {layout!r}; use one of {LAYOUTS}")
    prefill = torch.cat(parts, dim=0)
    return torch.cat([prefill, frames + trailing], dim=0), prefill.shape[0]


def build_talker_inputs(
    model,
    text_ids: list[torch.Tensor],
    codes: list[torch.Tensor],
    speaker_embeds: torch.Tensor,
    language_ids: list[int | None],
    layout: str = "non_streaming",
) -> TalkerInputs:
    """Build a right-padded batch. ``speaker_embeds`` is (B, D), one row per utterance."""
    eos = model.config.talker_config.codec_eos_token_id
    sequences, labels, frame_batch, frame_position, frame_codes = [], [], [], [], []
    for b, (ids, code, spk, lang) in enumerate(zip(text_ids, codes, speaker_embeds, language_ids, strict=True)):
        embeds, prefill_len = build_sequence(model, ids, code, spk, lang, layout)
        num_frames = code.shape[0]
        target = torch.full((embeds.shape[0],), IGNORE_INDEX, dtype=torch.long, device=code.device)
        first_codes = torch.cat([code[:, 0], code.new_tensor([eos])])  # (T + 1,)
        # The last prefill position predicts frame 0's first code, frame j's position frame j+1's, the last EOS.
        target[prefill_len - 1 :] = first_codes  # (T + 1,)
        sequences.append(embeds)
        labels.append(target)
        frame_batch.append(torch.full((num_frames,), b, dtype=torch.long))
        frame_position.append(prefill_len - 1 + torch.arange(num_frames))
        frame_codes.append(code)
    inputs_embeds = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True)
    lengths = torch.tensor([s.shape[0] for s in sequences], device=inputs_embeds.device)
    attention_mask = (torch.arange(inputs_embeds.shape[1], device=lengths.device)[None] < lengths[:, None]).long()
    return TalkerInputs(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        labels=torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
        frame_batch=torch.cat(frame_batch).to(inputs_embeds.device),
        frame_position=torch.cat(frame_position).to(inputs_embeds.device),
        frame_codes=torch.cat(frame_codes).long(),
        num_labels=sum(code.shape[0] + 1 for code in codes),
    )


@dataclass
class StepOutput:
    """Named loss components (scalars with gradient) and the token counts behind their averages."""

    codec0_loss: torch.Tensor
    sub_talker_loss: torch.Tensor
    codec0_tokens: int
    sub_talker_tokens: int
    hidden_states: torch.Tensor  # (B, L, D) talker last hidden states
    codec0_logits: torch.Tensor  # (B, L, V)
    sub_talker_logits: torch.Tensor  # (N, 15, V_cp) frame n's logits for codebooks 2..16
    frame_codec0_logits: torch.Tensor  # (N, V) the logits that predicted frame n's first code
    frame_batch: torch.Tensor  # (N,) batch row of frame n
    frame_codes: torch.Tensor  # (N, 16) frame n's target codes
    attention_mask: torch.Tensor  # (B, L) 1 for real positions
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # auxiliary loss components (unweighted)


def talker_forward(model, inputs: TalkerInputs) -> StepOutput:
    """Run talker + code predictor on built inputs; losses are token means over real (non-padding) targets."""
    talker = model.talker
    position_ids, _ = talker.get_rope_index(inputs.attention_mask)  # (3, B, L), as generate computes them
    hidden = talker.model(
        inputs_embeds=inputs.inputs_embeds,
        attention_mask=inputs.attention_mask,
        position_ids=position_ids,
        use_cache=False,
    ).last_hidden_state  # (B, L, D)
    logits = talker.codec_head(hidden)  # (B, L, V)
    # Mean over real targets; ignore_index instead of boolean indexing keeps the step free of host syncs.
    codec0_loss = F.cross_entropy(logits.flatten(0, 1).float(), inputs.labels.flatten(), ignore_index=IGNORE_INDEX)

    frame_hidden = hidden[inputs.frame_batch, inputs.frame_position]  # (N, D)
    codes = inputs.frame_codes  # (N, 16)
    predictor = talker.code_predictor
    sub_inputs = [frame_hidden[:, None], talker.get_input_embeddings()(codes[:, :1])]
    for k, embedding in enumerate(predictor.get_input_embeddings()[: codes.shape[1] - 2], start=1):
        sub_inputs.append(embedding(codes[:, k : k + 1]))
    sub_hidden = predictor.model(
        inputs_embeds=predictor.small_to_mtp_projection(torch.cat(sub_inputs, dim=1)), use_cache=False
    ).last_hidden_state  # (N, 16, D_cp)
    sub_logits = torch.stack(
        [head(sub_hidden[:, i]) for i, head in enumerate(predictor.lm_head, start=1)], dim=1
    )  # (N, 15, V_cp)
    sub_loss = F.cross_entropy(sub_logits.flatten(0, 1).float(), codes[:, 1:].flatten())
    return StepOutput(
        codec0_loss=codec0_loss,
        sub_talker_loss=sub_loss,
        codec0_tokens=inputs.num_labels,
        sub_talker_tokens=int(codes[:, 1:].numel()),
        hidden_states=hidden,
        codec0_logits=logits,
        sub_talker_logits=sub_logits,
        frame_codec0_logits=logits[inputs.frame_batch, inputs.frame_position],
        frame_batch=inputs.frame_batch,
        frame_codes=codes,
        attention_mask=inputs.attention_mask,
    )


class TalkerStep(torch.nn.Module):
    """The training step as one module, so ``accelerator.prepare`` (DDP, autocast) wraps the real forward.

    Holds the model and the fixed speaker embeddings (S, D) as a non-persistent buffer: the speaker encoder is
    not run during training, each sample is conditioned on ``speaker_embeds[batch["speaker"]]``. With
    ``aux_losses`` (``finetuning.training.losses.AuxiliaryLosses``, held but not registered as a submodule) the
    total also gets Σ weight · auxiliary component, and the unweighted components land in ``StepOutput.aux``.
    """

    def __init__(
        self,
        model,
        speaker_embeds: torch.Tensor,
        layout: str = "non_streaming",
        sub_talker_loss_weight: float = 0.3,
        aux_losses: AuxiliaryLosses | None = None,
    ):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; use one of {LAYOUTS}")
        self.model = model
        self.register_buffer("speaker_embeds", speaker_embeds.float(), persistent=False)
        self.layout = layout
        self.sub_talker_loss_weight = sub_talker_loss_weight
        # Not a submodule: the frozen decoder and speaker encoder stay outside DDP / FSDP / DeepSpeed, which would
        # otherwise wrap, cast or shard them (``training.engines``); ``train`` passes the mode on.
        object.__setattr__(self, "aux_losses", aux_losses)

    def train(self, mode: bool = True) -> TalkerStep:
        super().train(mode)
        if self.aux_losses is not None:
            self.aux_losses.train(mode)
        return self

    def forward(self, batch: dict) -> tuple[torch.Tensor, StepOutput]:
        """Returns (total loss, components) for a ``finetuning.training.data.collate`` batch."""
        tcfg = self.model.config.talker_config
        speaker_embeds = self.speaker_embeds[batch["speaker"]].to(self.model.talker.dtype)
        inputs = build_talker_inputs(
            self.model,
            batch["text_ids"],
            batch["codes"],
            speaker_embeds,
            [language_id_for(tcfg, lang) for lang in batch["language"]],
            layout=self.layout,
        )
        out = talker_forward(self.model, inputs)
        loss = out.codec0_loss + self.sub_talker_loss_weight * out.sub_talker_loss
        if self.aux_losses is not None and self.training:  # validation losses are talker losses only
            out.aux = self.aux_losses(out)
            loss = loss + self.aux_losses.weighted_sum(out.aux)
        return loss, out
