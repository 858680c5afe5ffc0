"""Post-training (paper section 3.3 / 7): supervised fine-tuning on chat and long-CoT data, and GRPO.

- :mod:`.formats`: dataset rows (Tulu-3 ``messages``, OpenMathReasoning ``problem``/``generated_solution``,
  OpenCodeReasoning ``input``/``output``, GSM8K ``question``/``answer``) → conversations;
- :mod:`.sft_data`: conversations → assistant-masked token rows, packed per document, as the training
  loop's micro-batches (SFT runs in :func:`mobilellm_r1.train.loop.train_stage`);
- :mod:`.grpo`: group-relative policy optimisation with verifiable rewards;
- :mod:`.chat`: an interactive / one-shot chat with a checkpoint.
"""
