"""Loading the extra models of the RLHF stages: frozen reward models and reference policy, and a
critic initialised from a reward model (PAPER.md §3.2.3).

Each loads any checkpoint :func:`llamalab.checkpoint.load_model` reads; the caller registers the
result as a submodule (inside ``configure_model``, so a sharding strategy sees it built under its
init context) and Lightning moves it to the device.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from llamalab.checkpoint import CheckpointError, load_backbone_into, load_model
from llamalab.model import Llama, LlamaScalar


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the model only scores."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_reward_model(path: str | Path, role: str) -> LlamaScalar:
    """A frozen reward model (scalar head) from ``path``; ``role`` names it in errors."""
    model = load_model(path)
    if not isinstance(model, LlamaScalar):
        raise CheckpointError(
            f"stage.{role}={path} is a language model, not a reward model (scalar head): "
            f"train one with `python src/train.py stage=reward` and point stage.{role} at it"
        )
    return freeze(model)  # type: ignore[return-value]


def load_reference(path: str | Path) -> Llama:
    """The frozen reference policy pi_0 (the SFT model the KL penalty is measured against)."""
    model = load_model(path)
    if not isinstance(model, Llama):
        raise CheckpointError(f"stage.init={path} holds a scalar model, not a language model")
    return freeze(model)  # type: ignore[return-value]


def load_critic(path: str | Path) -> LlamaScalar:
    """A trainable value model: a reward model's weights as they are (the usual start, PAPER.md
    §3.2.3 peers), or a language model's backbone with a fresh scalar head."""
    source = load_model(path)
    if isinstance(source, LlamaScalar):
        critic = source
    else:
        critic = LlamaScalar(source.config)
        critic.init_weights()
        load_backbone_into(critic, source.state_dict(), source=str(path))
    critic.train()
    for p in critic.parameters():
        p.requires_grad_(True)
    return critic


def check_same_vocabulary(models: dict[str, nn.Module]) -> None:
    """Every model must read the same token ids (policy, reference, critic, reward models)."""
    sizes = {role: m.config.vocab_size for role, m in models.items()}  # type: ignore[union-attr]
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{role}: {size}" for role, size in sizes.items())
        raise CheckpointError(
            "the RLHF models do not share one vocabulary "
            f"({listing}): train the reward models from the same SFT model as the policy"
        )
