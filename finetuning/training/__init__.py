"""Training: prepared configs -> batches -> the talker step and losses -> the loop -> a custom-voice export."""
