"""llamalab: the LLaMA 2 recipe (pretraining, SFT, reward models, PPO) on Lightning + Hydra."""

__version__ = "0.1.0"
