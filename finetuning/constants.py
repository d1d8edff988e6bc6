"""Constants of the domain, written once: the Qwen3-TTS 12 Hz codec and the custom-voice checkpoint layout."""

SAMPLE_RATE = 24_000  # Hz: prepared audio, the speech tokenizer's input and output, generated speech
FRAME_RATE_HZ = 12.5  # codec frames per second
SAMPLES_PER_FRAME = int(SAMPLE_RATE / FRAME_RATE_HZ)  # 1920 audio samples decode from one codec frame
NUM_CODEBOOKS = 16  # codes per frame: codebook 1 from the talker, 2-16 from the sub-talker (code predictor)
FIRST_SPEAKER_ROW = 3000  # codec-embedding row of the first custom-voice speaker (as in the released models)
