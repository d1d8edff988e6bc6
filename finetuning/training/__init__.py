"""Training: prepared configs -> batches -> the talker step and losses -> the loop -> a custom-voice export."""

import logging

# bitsandbytes (OPTIMIZER=adamw_8bit; peft imports it whenever it is installed) warns at import that a 4-bit CPU
# matmul kernel package is missing; nothing here uses 4-bit layers.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
