"""Post-training pieces: losses, models, oracles and data for the stages in minilm/stages/ (lessons 06-09).

    chat.py        Phi-3 chat rendering with a loss mask, reply parsing, padding collate
    base_model.py  the checkpoint a post-training stage starts from, with LoRA when asked
    sft.py         the SFT loss, chat batches, greedy replies judged by an oracle
    oracles.py     preference oracles: reference answers, verifier, reward model, judge, cyclic
    heads.py       HydraModel: one trunk with the LM head and scalar heads (reward, value)
    preferences.py preference pairs and their batches
    reward.py      Bradley-Terry loss, pair scores, Hydra-SFT's loss, loading a reward model
    dpo.py         the DPO loss, sequence log-probabilities, implicit-reward metrics
    ppo.py         PPO's math as pure functions: KL estimators, reward shaping, GAE, clipped losses
    ppo_models.py  PPO's four roles held four ways: ppo, lora, hydra, jhydra (Hydra-RLHF)
    dno.py         Direct Nash Optimization's math: both losses, large-margin pairs, replay, tabular demo
    winrate.py     win-rates with Wilson and bootstrap intervals, head-to-head judging, the plot

Nothing here is a stage: the stages (minilm/stages/) compose these pieces, and no piece imports a stage.
"""
