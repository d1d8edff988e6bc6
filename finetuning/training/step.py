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

Voice cloning (``generate_voice_clone``): ``s`` is the reference clip's x-vector. In x-vector mode the rest is as
above. In ICL mode (``generate_icl_prompt``) the reference transcript's content ids come before the target's in
``content`` and the reference frames ``R_i`` between codec BOS and the first generated frame, so the layouts read
    non_streaming: T(ref + content) + C(pad), T(tts_eos) + C(pad), T(tts_pad) + C(bos), R_i + T(tts_pad), F_j + ...
    streaming:     (C(bos), R_i, F_j) + (T(ref_0) .. T(content_last), T(tts_eos), T(tts_pad) ...) position by position
and the last reference frame's position predicts frame 0. Reference frames are given, never scored.

An instruction (``instruct=``: ids ``i`` of ``<|im_start|>user\n{instruct}<|im_end|>\n``, nothing sliced off)
comes first, as ``T(i)`` with no codec part, before the role tokens: every later position shifts by its length.
Voice design (``generate_voice_design``) has no speaker slot: ``P_i + T(tts_pad) ..., C(pad) + T(tts_bos)``.

The output at the last prefill position predicts frame 0's first code; the output at frame j's position
predicts frame j+1's first code, and the last frame's position predicts EOS. Labels are therefore the codes
shifted exactly once, and the loss is computed here from the logits (the model's own ``loss_function`` shifts
again, the official recipe's double shift). The code predictor for frame j gets [hidden state at the position
that predicted code_j0, C(code_j0), emb_1(code_j1), ..., emb_14(code_j14)]; its position i predicts code_ji
with ``lm_head[i-1]``, as in generation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from finetuning.training.layout import (
    EOS_LABEL,
    ROLE_TOKENS,
    SUFFIX_TOKENS,
    codec_prefix_ids,
    index_grids,
    positions,
    with_instructions,
    with_references,
)

if TYPE_CHECKING:
    from finetuning.training.losses import AuxiliaryLosses

LAYOUTS = ("non_streaming", "streaming")  # the text layouts of stock generate (``non_streaming_mode`` True / False)
MIXED = "mixed"  # TRAINING_LAYOUT that draws one of LAYOUTS per sample (``training.conditioning``)
IGNORE_INDEX = -100
AUTO_LANGUAGE = "auto"  # stock generation's language=None / "Auto": the nothink codec prefix, no language id
NUM_CONTROL_IDS = 1024  # stock generate suppresses the codebook-0 ids vocab-1024 .. vocab-1 except EOS


def assistant_text(text: str) -> str:
    """The prompt text ``generate_custom_voice`` tokenizes for one utterance."""
    return f"<|im_start|>assistant\n{text}<|im_end|>\n<|im_start|>assistant\n"


@dataclass
class TalkerInputs:
    """Everything one forward pass needs; B = batch, L = longest sequence, N = frames in the batch, D = width.

    inputs_embeds   (B, L, D) float   talker input, right-padded with zeros
    attention_mask  (B, L)    long    1 for real positions
    labels          (B, L)    long    first-codebook targets (codes + EOS), IGNORE_INDEX elsewhere
    label_batch     (N + B,)  long    batch row of each labelled position: the N frames, then each utterance's EOS
    label_position  (N + B,)  long    the labelled positions, the only ones the codec head scores
    frame_batch     (N,)      long    batch row of each frame
    frame_position  (N,)      long    position whose hidden state predicted that frame's first code
    frame_codes     (N, 16)   long    the frame's codes
    frame_codebook_embeds (N, 16, D)  codebook k's embedding of the frame in column k (sub-talker inputs)
    num_labels      int               targets in ``labels`` (counted without a device sync)
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    label_batch: torch.Tensor
    label_position: torch.Tensor
    frame_batch: torch.Tensor
    frame_position: torch.Tensor
    frame_codes: torch.Tensor
    frame_codebook_embeds: torch.Tensor
    num_labels: int  # real first-codebook targets (codes + EOS per utterance), counted on the host


def language_id_for(talker_config, language: str | None) -> int | None:
    """The codec language id generation uses for ``language``; None for "auto" and languages the model lacks."""
    if language is None or language.lower() == AUTO_LANGUAGE:
        return None
    return talker_config.codec_language_id.get(language.lower())


def sequence_length(
    talker_config,
    num_text_tokens: int,
    num_frames: int,
    language: str | None,
    layout: str,
    reference: int = 0,
    instruct: int = 0,
) -> int:
    """Talker positions ``build_sequence`` makes for one utterance (the padded cost batching budgets for);
    ``reference`` = an ICL reference's content tokens + frames, ``instruct`` = its instruction's tokens (counted
    with a speaker slot: an upper bound for voice design). ``layout`` "mixed" counts the longer layout."""
    prefix = codec_prefix_ids(talker_config, language_id_for(talker_config, language))
    layout = "non_streaming" if layout == MIXED else layout
    content = num_text_tokens - ROLE_TOKENS - SUFFIX_TOKENS
    return positions(len(prefix), content, num_frames, layout, instruct) + reference


@functools.lru_cache(maxsize=8)
def codec0_suppression(vocab_size: int, eos_id: int, device: torch.device) -> torch.Tensor:
    """(V,) float32: 0, or -inf at the codebook-0 ids stock generation never emits (``suppress_tokens``: the last
    NUM_CONTROL_IDS ids except EOS). Added to the codec head's logits, so the loss normalises over the ids
    generation can choose from."""
    bias = torch.zeros(vocab_size, dtype=torch.float32)
    bias[vocab_size - NUM_CONTROL_IDS :] = float("-inf")
    bias[eos_id] = 0.0
    return bias.to(device)


def frame_embeddings(talker, codes: torch.Tensor) -> torch.Tensor:
    """(..., 16) codes -> (..., D): first codebook through the talker's codec embedding, the rest through the code
    predictor's embeddings, summed (as generate feeds a finished frame back)."""
    return _sum_codebooks(codebook_embeddings(talker, codes, talker.get_input_embeddings()(codes[..., 0])))


def codebook_embeddings(talker, codes: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """(N, 16) codes and ``first`` = (N, D) codec embeddings of their first codebook -> (N, 16, D), codebook k's
    embedding in column k: one call per code-predictor table. The talker input sums them; the sub-talker reads
    columns 0-14 as its inputs, so both share the same lookups (and backward adds one gradient per table)."""
    predictor_tables = talker.code_predictor.get_input_embeddings()
    return torch.stack([first] + [table(codes[..., k]) for k, table in enumerate(predictor_tables, start=1)], dim=-2)


def _sum_codebooks(per_codebook: torch.Tensor) -> torch.Tensor:
    """(..., 16, D) -> (..., D): one sum over the codebooks, as generate sums a fed-back frame (``.sum(1)``)."""
    return per_codebook.sum(dim=-2)


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
    inputs = build_talker_inputs(model, [text_ids], [codes], speaker_embed[None], [language_id], layout)
    return inputs.inputs_embeds[0], int(inputs.frame_position[0]) + 1


def build_talker_inputs(
    model,
    text_ids: list[torch.Tensor],
    codes: list[torch.Tensor],
    speaker_embeds: torch.Tensor | None,
    language_ids: list[int | None],
    layout: str | list[str] = "non_streaming",
    ref_text_ids: list[torch.Tensor | None] | None = None,
    ref_codes: list[torch.Tensor | None] | None = None,
    instruct_ids: list[torch.Tensor | None] | None = None,
) -> TalkerInputs:
    """Build a right-padded batch (the layout in the module docstring) with one embedding call per table.

    text_ids: B tensors (Lt_b,) long; codes: B tensors (T_b, 16) long, T_b >= 1; speaker_embeds (B, D), one row
    per utterance; language_ids: B codec language ids (None = "auto"); ``layout``: one of LAYOUTS for the batch or
    one per utterance. ICL voice cloning: ``ref_text_ids`` B
    tensors (Lr_b,) of the reference transcript's content ids and ``ref_codes`` B tensors (R_b, 16), R_b >= 1,
    both None for an utterance without one. ``instruct_ids``: B tensors (Li_b,) of each instruction's whole user
    turn (``layout.instruct_text``), None for an utterance without one. ``speaker_embeds`` None: no speaker slot
    (voice design). Every position's text row and codec id come from index grids computed
    from the lengths; the embeddings are gathered into the (B, L, D) batch. Raises ValueError for an unknown
    ``layout`` or a reference with text but no codes (or codes but no text).
    """
    if any(name not in LAYOUTS for name in ([layout] if isinstance(layout, str) else layout)):
        raise ValueError(f"unknown layout {layout!r}; use one of {LAYOUTS}")
    cfg, talker = model.config, model.talker
    tcfg = cfg.talker_config
    device = codes[0].device if speaker_embeds is None else speaker_embeds.device
    text_ids, blocks, ref_frames = with_references(text_ids, codes, ref_text_ids, ref_codes)
    text_ids, heads = with_instructions(text_ids, instruct_ids)
    slot = speaker_embeds is not None
    grid = index_grids(tcfg, text_ids, codes, language_ids, layout, device, ref_frames, heads, slot)
    all_codes = torch.cat(blocks).long()  # (N_all, 16)
    first_codes = all_codes[:, 0]  # (N,)
    # torch.where over gathered values, not boolean indexing: no host sync on a GPU.
    frame_codes = first_codes[grid.frame_index.clamp(min=0)]  # (B, L)
    codec = talker.get_input_embeddings()(torch.where(grid.frame_index >= 0, frame_codes, grid.codec_ids))
    if slot:
        codec = torch.where(grid.is_speaker[..., None], speaker_embeds[:, None].to(codec.dtype), codec)
    # Finished frames: codebook 0 from the grid above plus the 15 code-predictor tables, summed as generate does.
    frame_slots = (grid.slot_batch, grid.slot_position)  # each frame's own position, reference frames included
    per_codebook = codebook_embeddings(talker, all_codes, codec[frame_slots])  # (N_all, 16, D)
    codec = codec.index_put(frame_slots, _sum_codebooks(per_codebook))
    if any(ref_frames):  # only the utterances' own frames are targets
        all_codes, per_codebook = all_codes[grid.target_frames], per_codebook[grid.target_frames]  # (N, ...)
    codec = torch.where(grid.has_codec[..., None], codec, 0.0)  # role tokens and padding have no codec part

    special_ids = torch.tensor([cfg.tts_bos_token_id, cfg.tts_eos_token_id, cfg.tts_pad_token_id], device=device)
    text_table = talker.text_projection(talker.get_text_embeddings()(torch.cat([special_ids, *text_ids])))
    text = torch.where(grid.attention_mask[..., None].bool(), text_table[grid.text_rows], 0.0)  # (B, L, D)

    labels = torch.where(grid.label_index >= 0, first_codes[grid.label_index.clamp(min=0)], IGNORE_INDEX)
    labels = torch.where(grid.label_index == EOS_LABEL, tcfg.codec_eos_token_id, labels)  # (B, L)
    # Frames are contiguous and in batch order; each utterance's EOS target sits right after its last frame.
    rows = torch.arange(len(codes), device=device)
    last_frame = torch.searchsorted(grid.frame_batch, rows, right=True) - 1  # (B,)
    return TalkerInputs(
        inputs_embeds=codec + text,
        attention_mask=grid.attention_mask,
        labels=labels,
        label_batch=torch.cat([grid.frame_batch, rows]),
        label_position=torch.cat([grid.frame_position, grid.frame_position[last_frame] + 1]),
        frame_batch=grid.frame_batch,
        frame_position=grid.frame_position,
        frame_codes=all_codes,
        frame_codebook_embeds=per_codebook,
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
    label_logits: torch.Tensor | None  # (N + B, V) float codebook-0 logits at the labelled positions, -inf at the ids
    # generation suppresses (``codec0_suppression``); None when fused
    label_targets: torch.Tensor  # (N + B,) their targets: the N frames' first codes, then each utterance's EOS
    sub_talker_head_logits: list[torch.Tensor] | None  # 15 x (N, V_cp), head i's for codebook i+1; None when fused
    frame_codec0_logits: torch.Tensor | None  # (N, V) the logits that predicted frame n's first code; None when fused
    frame_batch: torch.Tensor  # (N,) batch row of frame n
    frame_codes: torch.Tensor  # (N, 16) frame n's target codes
    attention_mask: torch.Tensor  # (B, L) 1 for real positions
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # auxiliary loss components (unweighted)

    @cached_property
    def sub_talker_logits(self) -> torch.Tensor | None:
        """(N, 15, V_cp): frame n's logits for codebooks 2..16 (None when fused), stacked on first use: only the
        auxiliary losses and evaluation read them, and the training step would otherwise copy every logit."""
        return None if self.sub_talker_head_logits is None else torch.stack(self.sub_talker_head_logits, dim=1)


def talker_forward(model, inputs: TalkerInputs, fused_cross_entropy: Callable | None = None) -> StepOutput:
    """Run talker + code predictor on built inputs; losses are token means over real (non-padding) targets.

    ``fused_cross_entropy(weight, hidden, targets, bias)`` (FUSED_CROSS_ENTROPY, ``speed.fused_cross_entropy``)
    computes each head's loss without building its logits; the logit fields of the output are then None.

    The batch is right-padded and attention is causal, so a real position only attends to real positions before
    it: the model's own causal mask and positions 0..L-1 give every real position exactly what generate computes
    for it (``get_rope_index`` also numbers real positions 0..len-1), without building a padding mask per step.
    The codec head scores only the N + B labelled positions (``label_logits``), never the text prefix.
    Padded positions see garbage and are never scored.
    """
    talker = model.talker
    embeds = inputs.inputs_embeds
    # An all-ones padding mask says "no padding" to transformers. Without one, the talker's position ids make it
    # look for packed sequences and build a (B, 1, L, L) mask every step, which also keeps SDPA and
    # FlashAttention off their is_causal kernels.
    no_padding = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    hidden = talker.model(inputs_embeds=embeds, attention_mask=no_padding, use_cache=False).last_hidden_state
    # Codebook 0 is scored only where there is a target; text positions never reach the 3072-way head.
    label_hidden = hidden[inputs.label_batch, inputs.label_position]  # (N + B, D)
    label_targets = inputs.labels[inputs.label_batch, inputs.label_position]  # (N + B,)
    head, logits = talker.codec_head, None
    tcfg = model.config.talker_config
    # Over the ids generation can emit only: the control ids it suppresses get no probability mass here either.
    suppressed = codec0_suppression(tcfg.vocab_size, tcfg.codec_eos_token_id, label_hidden.device)
    if fused_cross_entropy is None:
        logits = head(label_hidden).float() + suppressed  # (N + B, V), -inf at the suppressed ids
        codec0_loss = F.cross_entropy(logits, label_targets)
    else:
        bias = suppressed.to(label_hidden.dtype) if head.bias is None else head.bias + suppressed.to(head.bias.dtype)
        codec0_loss = fused_cross_entropy(head.weight, label_hidden, label_targets, bias)

    frame_hidden = hidden[inputs.frame_batch, inputs.frame_position]  # (N, D)
    codes = inputs.frame_codes  # (N, 16)
    predictor = talker.code_predictor
    # [hidden that predicted code_j0, C(code_j0), emb_1(code_j1), ..., emb_14(code_j14)]
    sub_inputs = torch.cat([frame_hidden[:, None], inputs.frame_codebook_embeds[:, :-1]], dim=1)  # (N, 16, D)
    sub_hidden = predictor.model(
        inputs_embeds=predictor.small_to_mtp_projection(sub_inputs), use_cache=False
    ).last_hidden_state  # (N, 16, D_cp)
    # Head i scores codebook i from position i, one head at a time: each head's (N, V_cp) logits stay in cache from
    # its matmul through the softmax and back, and no per-step stack of the head weights is built.
    heads = list(enumerate(predictor.lm_head, start=1))
    head_inputs = sub_hidden.unbind(1)  # 16 x (N, D_cp); one stack in backward, not one full-size zero fill a head
    head_logits = None
    if fused_cross_entropy is None:
        head_logits, per_head = [], []
        for i, head in heads:  # each head's loss right after its logits (and in backward: its softmax, then its matmul)
            head_logits.append(head(head_inputs[i]))
            per_head.append(F.cross_entropy(head_logits[-1].float(), codes[:, i], reduction="sum"))
        sub_loss = torch.stack(per_head).sum() / codes[:, 1:].numel()
    else:  # every head scores N targets: the mean of the heads' means is the token mean
        per_head = [fused_cross_entropy(h.weight, head_inputs[i], codes[:, i], h.bias) for i, h in heads]
        sub_loss = torch.stack(per_head).mean()
    return StepOutput(
        codec0_loss=codec0_loss,
        sub_talker_loss=sub_loss,
        codec0_tokens=inputs.num_labels,
        sub_talker_tokens=int(codes[:, 1:].numel()),
        hidden_states=hidden,
        label_logits=logits,
        label_targets=label_targets,
        sub_talker_head_logits=head_logits,
        frame_codec0_logits=None if logits is None else logits[: frame_hidden.shape[0]],  # label rows 0..N-1
        frame_batch=inputs.frame_batch,
        frame_codes=codes,
        attention_mask=inputs.attention_mask,
    )


class TalkerStep(torch.nn.Module):
    """The training step as one module, so ``accelerator.prepare`` (DDP, autocast) wraps the real forward.

    Holds the model and the fixed speaker embeddings (S, D) as a non-persistent buffer: the speaker encoder is
    not run during training, each sample is conditioned on ``speaker_embeds[batch["speaker"]]``; in voice-clone
    training the batch brings each reference's x-vector itself (``batch["xvector"]``, gathered in ``collate``
    from the one per-clip table, which never goes to the device). ``layout`` is the text layout of batches that do
    not name one per utterance (``batch["layout"]``, TRAINING_LAYOUT=mixed). With
    ``aux_losses`` (``finetuning.training.losses.AuxiliaryLosses``, held but not registered as a submodule) the
    total also gets Σ weight · auxiliary component, and the unweighted components land in ``StepOutput.aux``.
    ``fused_cross_entropy``: see ``talker_forward``. ``speaker_slot`` False (voice design): no speaker in the
    prefix. A batch with ``instruct_ids`` puts each instruction before its role tokens.
    """

    def __init__(
        self,
        model,
        speaker_embeds: torch.Tensor,
        layout: str = "non_streaming",
        sub_talker_loss_weight: float = 0.3,
        aux_losses: AuxiliaryLosses | None = None,
        fused_cross_entropy: Callable | None = None,
        speaker_slot: bool = True,
    ):
        super().__init__()
        if layout not in (*LAYOUTS, MIXED):
            raise ValueError(f"unknown layout {layout!r}; use one of {(*LAYOUTS, MIXED)}")
        self.model = model
        self.register_buffer("speaker_embeds", speaker_embeds.float(), persistent=False)
        self.layout = layout
        self.sub_talker_loss_weight = sub_talker_loss_weight
        self.speaker_slot = speaker_slot
        # Not a submodule: the frozen decoder and speaker encoder stay outside DDP / FSDP / DeepSpeed, which would
        # otherwise wrap, cast or shard them (``training.engines``); ``train`` passes the mode on.
        object.__setattr__(self, "aux_losses", aux_losses)
        self.fused_cross_entropy = fused_cross_entropy

    def train(self, mode: bool = True) -> TalkerStep:
        super().train(mode)
        if self.aux_losses is not None:
            self.aux_losses.train(mode)
        return self

    def forward(self, batch: dict) -> tuple[torch.Tensor, StepOutput]:
        """Returns (total loss, components) for a ``finetuning.training.data.collate`` batch."""
        tcfg = self.model.config.talker_config
        if "xvector" in batch:  # voice cloning: the reference clip's x-vector
            speaker_embeds = batch["xvector"].to(self.model.talker.dtype)
        elif not self.speaker_slot:  # voice design
            speaker_embeds = None
        else:
            speaker_embeds = self.speaker_embeds[batch["speaker"]].to(self.model.talker.dtype)
        layout = batch.get("layout") or self.layout
        if layout == MIXED:
            raise ValueError("TRAINING_LAYOUT=mixed: the batch must name each utterance's layout (batch['layout'])")
        inputs = build_talker_inputs(
            self.model,
            batch["text_ids"],
            batch["codes"],
            speaker_embeds,
            [language_id_for(tcfg, lang) for lang in batch["language"]],
            layout=layout,
            ref_text_ids=batch.get("ref_text_ids"),
            ref_codes=batch.get("ref_codes"),
            instruct_ids=batch.get("instruct_ids"),
        )
        out = talker_forward(self.model, inputs, self.fused_cross_entropy)
        loss = out.codec0_loss + self.sub_talker_loss_weight * out.sub_talker_loss
        if self.aux_losses is not None and self.training:  # validation losses are talker losses only
            out.aux = self.aux_losses(out)
            loss = loss + self.aux_losses.weighted_sum(out.aux)
        return loss, out
