"""Generation with the KV cache: everything that turns prompts into sampled tokens or answers.

- :mod:`~.sampling`: :func:`generate` (batched sampling: greedy, temperature, top-k, top-p),
  :class:`GenerationOutput`, the samplers and left padding.
- :mod:`~.compiled`: the compiled, static-shape decode step behind ``generate(compile=True)``.
- :mod:`~.answer`: the one "answer these prompts" path: chunked, seeded sampling
  (:func:`sample_responses`, also PPO's and rejection sampling's rollouts) and
  :func:`answer_prompts` (dialogs in Meta's chat format -> text cut at EOS), used by SFT's
  validation samples, ``src/generate.py`` and ``src/chat.py``; :func:`answer_turns`, multi-turn
  dialogs answered turn by turn from their own answers (Ghost Attention's samples and its
  adherence by turn, :mod:`llamalab.data.gatt`).

Imports the model and the tokenizer only (no Lightning).
"""

from llamalab.generation.answer import (
    TURN_SEED_STRIDE,
    Answer,
    answer_prompts,
    answer_turns,
    decode_answer,
    generate_chunks,
    merge_generations,
    play_turns,
    sample_responses,
)
from llamalab.generation.sampling import (
    GenerationOutput,
    generate,
    left_pad,
    sample_next,
    sample_top_p,
)

__all__ = [
    "TURN_SEED_STRIDE",
    "Answer",
    "GenerationOutput",
    "answer_prompts",
    "answer_turns",
    "decode_answer",
    "generate",
    "generate_chunks",
    "left_pad",
    "merge_generations",
    "play_turns",
    "sample_next",
    "sample_responses",
    "sample_top_p",
]
