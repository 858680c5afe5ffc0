"""Training: one loop for every stage (pre-training, mid-training with distillation, SFT).

- :mod:`.schedule`: learning-rate schedules of paper Table 2.
- :mod:`.objectives`: the fused head + loss (next-token CE, knowledge distillation, SFT masks).
- :mod:`.checkpoint`: atomic, resumable training checkpoints.
- :mod:`.distributed`: torchrun process groups, DDP / FSDP2 wrapping.
- :mod:`.loop`: the loop itself.
"""
