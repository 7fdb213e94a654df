"""Post-training: chat format, SFT, reward models, DPO, PPO and Hydra-RLHF, DNO (lessons 06-09).

    chat.py        Phi-3 chat rendering with a loss mask, reply parsing, padding collate
    loop.py        the one training loop every post-training stage shares (PostConfig, run_loop)
    sft.py         supervised fine-tuning on chat data, with before/after format measurements
    oracles.py     preference oracles: reference answers, verifier, reward model, judge, cyclic
    heads.py       HydraModel: one trunk with the LM head and scalar heads (reward, value)
    preferences.py preference pairs and their batches
    reward.py      reward model (Bradley-Terry); lm_weight > 0 keeps the LM loss too
    dpo.py         direct preference optimization against a frozen (or LoRA-off) reference
    hydra.py       Hydra-SFT: one model trained on SFT chats and preference pairs together
    ppo.py         PPO's math as pure functions: KL estimators, reward shaping, GAE, clipped losses
    ppo_models.py  PPO's four roles held four ways: ppo, lora, hydra, jhydra (Hydra-RLHF)
    ppo_loop.py    one PPO step (roll out, score, advantages, update) and run_ppo with exact resume
    dno.py         Direct Nash Optimization's math: both losses, large-margin pairs, replay, tabular demo
    dno_loop.py    DNO-Prct iterations: sample, add the teacher, ask the oracle, train pi_{t+1} from pi_t

Every stage reads a checkpoint (usually `minilm train`'s) and writes one in the same format,
with `meta["stage"]` saying which stage made it. `minilm ppo --variant {ppo,lora,hydra,jhydra}`
and `minilm hydra-sft` run the Hydra stages; benchmarks/hydra_memory.py measures their memory;
`minilm dno` runs DNO and benchmarks/dno_baselines.py compares it with its baselines.
"""
