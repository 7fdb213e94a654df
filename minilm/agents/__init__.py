"""Agents that learn through communication (LTC, lesson 10): text environments in `envs/`."""
