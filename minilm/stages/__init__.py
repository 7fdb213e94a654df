"""The training stages, one file each (lessons 03 and 06-11): a Config dataclass, its named presets,
and `run_<stage>(cfg)`. `minilm <stage>` and `minilm speedrun` call the same function.

    pretrain  sft  reward  dpo  hydra_sft  ppo  dno  ltc  prune

A stage composes pieces from minilm/post/, minilm/agents/, minilm/prune/ and minilm/loop.py; no
stage imports another stage.
"""
