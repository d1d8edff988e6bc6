"""Where every talker input embedding goes: index grids computed from the lengths of a batch alone.

The layouts themselves (what stock generation feeds the talker: custom voice, voice cloning, an instruction before
the role tokens, voice design without a speaker slot) are described in
``finetuning.training.step``, which gathers the embeddings into these grids; this module is integer bookkeeping
only (no model, no embeddings), so it can be read and tested on its own.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

ROLE_TOKENS = 3  # "<|im_start|>", "assistant", "\n"
SUFFIX_TOKENS = 5  # "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"
BOS_ROW, EOS_ROW, PAD_ROW = 0, 1, 2  # text-table rows of tts_bos, tts_eos, tts_pad; every utterance's text follows
NUM_SPECIAL_ROWS = 3
EOS_LABEL = -2  # label-grid value: this position's target is codec EOS


def codec_prefix_ids(talker_config, language_id: int | None) -> list[int]:
    if language_id is None:
        return [talker_config.codec_nothink_id, talker_config.codec_think_bos_id, talker_config.codec_think_eos_id]
    return [
        talker_config.codec_think_id,
        talker_config.codec_think_bos_id,
        language_id,
        talker_config.codec_think_eos_id,
    ]


def positions(
    num_prefix: int, num_content: int, num_frames: int, layout: str, instruct: int = 0, speaker_slot: bool = True
) -> int:
    """The instruction (``instruct`` tokens, 0 = none) and role tokens, codec prefix + speaker (when the mode has
    a slot) + pad, the text part (all content + tts_eos + codec BOS, or only the first content token with codec
    BOS when streaming), then the frames."""
    text_part = num_content + 2 if layout == "non_streaming" else 1
    return instruct + ROLE_TOKENS + num_prefix + int(speaker_slot) + 1 + text_part + num_frames


def instruct_text(instruct: str) -> str:
    """The text stock generation tokenizes for an instruction (``_build_instruct_text``): the whole user turn."""
    return f"<|im_start|>user\n{instruct}<|im_end|>\n"


def with_instructions(text_ids, instruct_ids) -> tuple[list[torch.Tensor], list[int]]:
    """(text ids with each utterance's instruction ids before its role tokens, as stock places the instruction
    segment; each utterance's head = instruction + role tokens, the positions with no codec part)."""
    instruct_ids = instruct_ids or [None] * len(text_ids)
    pairs = list(zip(text_ids, instruct_ids, strict=True))
    text_ids = [t if i is None else torch.cat([i, t]) for t, i in pairs]
    return text_ids, [ROLE_TOKENS + (0 if i is None else i.shape[0]) for i in instruct_ids]


def per_utterance(layout: str | list[str], batch_size: int) -> list[str]:
    """One layout per utterance: ``layout`` itself when it is a list, else ``layout`` for every utterance."""
    layouts = [layout] * batch_size if isinstance(layout, str) else list(layout)
    if len(layouts) != batch_size:
        raise ValueError(f"{len(layouts)} layouts for {batch_size} utterances")
    return layouts


def with_references(text_ids, codes, ref_text_ids, ref_codes):
    """(text ids with each ICL reference's content before the utterance's own, after the role tokens (before any
    instruction is prepended, ``with_instructions``); the code
    blocks with each reference's frames before its utterance's; reference frames per utterance)."""
    ref_text_ids, ref_codes = ref_text_ids or [None] * len(codes), ref_codes or [None] * len(codes)
    if any((t is None) != (c is None) for t, c in zip(ref_text_ids, ref_codes, strict=True)):
        raise ValueError("an ICL reference needs both its transcript ids and its codes")
    pairs = list(zip(text_ids, ref_text_ids, strict=True))
    text_ids = [t if r is None else torch.cat([t[:ROLE_TOKENS], r, t[ROLE_TOKENS:]]) for t, r in pairs]
    blocks = [c for r, t in zip(ref_codes, codes, strict=True) for c in ([t] if r is None else [r, t])]
    return text_ids, blocks, [0 if r is None else r.shape[0] for r in ref_codes]


@dataclass
class IndexGrids:
    """Where every embedding goes, for a batch of B utterances padded to L positions (N target frames, N_all with
    the ICL reference frames; all frames in ``codes`` order, each utterance's reference frames before its own).

    text_rows      (B, L) long  row of the text table (tts specials, then every utterance's text ids)
    codec_ids      (B, L) long  codec id (frames: filled from the codes by the caller)
    frame_index    (B, L) long  frame n (of N_all) at this position, -1 elsewhere
    label_index    (B, L) long  frame n (of N_all) whose first code is this position's target; EOS_LABEL; -1 = none
    is_speaker     (B, L) bool  the speaker slot
    has_codec      (B, L) bool  positions with a codec part (all real positions after the head: instruction + role)
    attention_mask (B, L) long  1 for real positions
    frame_batch    (N,)   long  batch row of each target frame
    frame_position (N,)   long  position that predicts the target frame's first code (the position before it)
    target_frames  (N,)   long  each target frame's index among the N_all frames
    slot_batch     (N_all,) long  batch row of every frame
    slot_position  (N_all,) long  every frame's own position
    """

    text_rows: torch.Tensor
    codec_ids: torch.Tensor
    frame_index: torch.Tensor
    label_index: torch.Tensor
    is_speaker: torch.Tensor
    has_codec: torch.Tensor
    attention_mask: torch.Tensor
    frame_batch: torch.Tensor
    frame_position: torch.Tensor
    target_frames: torch.Tensor
    slot_batch: torch.Tensor
    slot_position: torch.Tensor


def index_grids(
    tcfg,
    text_ids,
    codes,
    language_ids,
    layout: str | list[str],
    device,
    ref_frames: list[int],
    heads: list[int] | None = None,
    speaker_slot: bool = True,
) -> IndexGrids:
    """Index grids from the lengths alone (tensor shapes: no device sync), with one host-to-device copy.
    ``layout``: one text layout for the batch, or one per utterance (a batch may mix them). ``heads``: each
    utterance's text positions before its codec prefix (instruction + role tokens; default the role tokens);
    ``speaker_slot`` False leaves the slot out (voice design), so the codec pad follows the prefix."""
    layouts = per_utterance(layout, len(text_ids))
    heads = heads or [ROLE_TOKENS] * len(text_ids)
    slot = int(speaker_slot)
    num_text = [ids.shape[0] for ids in text_ids]
    num_targets = [code.shape[0] for code in codes]
    num_frames = [r + t for r, t in zip(ref_frames, num_targets, strict=True)]
    prefixes = [codec_prefix_ids(tcfg, lang) for lang in language_ids]
    num_content = [n - h - SUFFIX_TOKENS for n, h in zip(num_text, heads, strict=True)]
    lengths = [
        positions(len(p), c, t, lay, h - ROLE_TOKENS, speaker_slot)
        for p, c, t, lay, h in zip(prefixes, num_content, num_frames, layouts, heads, strict=True)
    ]
    max_prefix = max(len(p) for p in prefixes)
    padded_prefixes = [p + [tcfg.codec_pad_id] * (max_prefix - len(p)) for p in prefixes]
    columns = [
        [NUM_SPECIAL_ROWS + start for start in _starts(num_text)],  # first text-table row of each utterance
        num_content,
        [len(p) for p in prefixes],
        num_frames,
        _starts(num_frames),  # first frame of each utterance among the N_all
        ref_frames,
        _starts(num_targets),  # first target frame of each utterance among the N
        [int(lay == "non_streaming") for lay in layouts],
        heads,
        *map(list, zip(*padded_prefixes, strict=True)),
    ]
    values = torch.tensor(columns, dtype=torch.long).to(device)[:, :, None]  # (9 + max_prefix, B, 1)
    text_start, content, prefix_len, frames, first_frame, refs, first_target, non_streaming, head = values[:9]
    prefix_table = values[9:, :, 0].T  # (B, max_prefix)
    batch_size, num_all_frames, num_all_targets = len(num_text), sum(num_frames), sum(num_targets)

    prefix_end = head + prefix_len + slot + 1  # + speaker slot, codec pad
    bos = prefix_end + (content + 1) * non_streaming  # codec BOS position, (B, 1)
    pos = torch.arange(max(lengths), device=device)[None]  # (1, L)
    real = pos < bos + 1 + frames  # (B, L)

    k = pos - prefix_end  # both layouts read content k, then tts_eos, then tts_pad from the end of the prefix on
    text_rows = torch.where(k < content, text_start + head + k, torch.where(k == content, EOS_ROW, PAD_ROW))
    text_rows = torch.where(k == -1, BOS_ROW, torch.where(k < -1, PAD_ROW, text_rows))
    text_rows = torch.where(pos < head, text_start + pos, text_rows)  # instruction and role tokens

    prefix_slot = (pos - head).clamp(0, max_prefix - 1)  # (B, L)
    codec_ids = torch.where(pos < bos, tcfg.codec_pad_id, tcfg.codec_bos_id)
    codec_ids = torch.where(pos < head + prefix_len, prefix_table.gather(1, prefix_slot), codec_ids)
    frame_in_utterance = pos - bos - 1
    frame_index = torch.where((frame_in_utterance >= 0) & real, first_frame + frame_in_utterance, -1)
    # the position before the first target frame (codec BOS, or the last reference frame) predicts it; the last
    # frame's position predicts EOS
    label_in_utterance = pos - bos - refs
    targets = frames - refs
    label_index = torch.where(label_in_utterance < targets, first_frame + refs + label_in_utterance, EOS_LABEL)
    label_index = torch.where((label_in_utterance >= 0) & (label_in_utterance <= targets), label_index, -1)

    frame_batch = torch.repeat_interleave(
        torch.arange(batch_size, device=device), targets[:, 0], output_size=num_all_targets
    )  # (N,)
    frame_number = torch.arange(num_all_targets, device=device) - first_target[frame_batch, 0]
    slot_batch = torch.repeat_interleave(
        torch.arange(batch_size, device=device), frames[:, 0], output_size=num_all_frames
    )  # (N_all,)
    slot_number = torch.arange(num_all_frames, device=device) - first_frame[slot_batch, 0]
    return IndexGrids(
        text_rows=torch.where(real, text_rows, PAD_ROW),
        codec_ids=torch.where(real, codec_ids, tcfg.codec_pad_id),
        frame_index=frame_index,
        label_index=label_index,
        is_speaker=(pos == head + prefix_len) & bool(slot),
        has_codec=real & (pos >= head),
        attention_mask=real.long(),
        frame_batch=frame_batch,
        frame_position=bos[frame_batch, 0] + refs[frame_batch, 0] + frame_number,
        target_frames=first_frame[frame_batch, 0] + refs[frame_batch, 0] + frame_number,
        slot_batch=slot_batch,
        slot_position=bos[slot_batch, 0] + 1 + slot_number,
    )


def _starts(counts: list[int]) -> list[int]:
    """Start of each block when blocks of ``counts`` are concatenated: [0, c0, c0 + c1, ...]."""
    return [0, *itertools.accumulate(counts)][:-1]
