"""The built-in alignment world: default data for SFT, both reward models, PPO and GAtt.

No data can be downloaded here, yet the whole LLaMA 2 recipe should run and *show an effect* on a
tiny model (about 5M parameters, a few-thousand-piece vocabulary, context 256-512) on CPU in
minutes (DESIGN.md "Built-in data"). So the world is small, regular and has a checkable ground
truth (:mod:`llamalab.data.judge`). One module per concern:

- ``world``: the stdlib objects and their summaries, the harms, the borderline tasks (seed-free);
- ``questions``: safe / harmful / borderline questions, the train and held-out phrasings, the
  canned answers (refusals, compliances, non-answers...) the data sets are made of;
- ``sft``: the imperfect SFT dialogs; ``gatt``: the Ghost Attention dialogs;
- ``preferences``: the pairs for the helpfulness and the safety reward model;
- ``prompts``: PPO / rejection-sampling prompts and the held-out evaluation prompts;
- ``summary``: ``describe``, the counts the README quotes.

Every generator is deterministic for a given ``(seed, Python version)``: it draws from
``random.Random(f"{seed}/{purpose}")`` (string seeds are hashed with SHA-512, never with the
per-process string hash) and never touches the global ``random`` state.

The names below are re-exported so that ``from llamalab.data.builtin import builtin_sft`` (and
``from llamalab.data import builtin as B; B.builtin_sft``) keep working.
"""

from llamalab.data.builtin.gatt import (
    GATT_INSTRUCTIONS,
    GATT_SIZE,
    GattPrompt,
    GattRecord,
    apply_instruction,
    builtin_gatt,
    builtin_gatt_eval,
    follows_instruction,
    gatt_sampling_messages,
)
from llamalab.data.builtin.preferences import (
    HELPFUL_REJECTIONS,
    PREF_HISTORY_RATE,
    PREF_SYSTEM_RATE,
    PREFERENCE_SIZES,
    SAFETY_MIX,
    PreferenceRecord,
    builtin_preferences,
    preference_examples,
)
from llamalab.data.builtin.prompts import (
    PROMPT_KIND_WEIGHTS,
    PROMPT_SIZES,
    PROMPT_SYSTEM_RATE,
    builtin_eval_prompts,
    builtin_prompts,
)
from llamalab.data.builtin.questions import (
    COMPLIANCES,
    NON_ANSWERS,
    PARAPHRASE_OPENINGS,
    REFUSALS,
    SAFE_TEMPLATES,
    SPLITS,
    SYSTEM_PROMPTS,
    TASK_TEMPLATES,
    TERSE_REFUSAL,
    PromptRecord,
    Question,
    QuestionPool,
    all_questions,
    compliance,
    non_answer,
    paraphrase,
    refusal,
    truncated,
    wrong_answer,
)
from llamalab.data.builtin.sft import (
    SFT_FALSE_REFUSAL_RATE,
    SFT_HELPFUL_RATE,
    SFT_KIND_WEIGHTS,
    SFT_MULTI_TURN_RATE,
    SFT_REFUSAL_RATE,
    SFT_SIZE,
    SFT_SYSTEM_RATE,
    SFT_WRONG_SHARE,
    Dialog,
    SftRecord,
    builtin_sft,
    sft_dialogs,
)
from llamalab.data.builtin.summary import describe
from llamalab.data.builtin.world import (
    BORDERLINE_TASKS,
    HARMS,
    HELD_OUT_HARMS,
    MAX_NAME_F1,
    MAX_PAIR_F1,
    N_OBJECTS,
    World,
    WorldObject,
    builtin_world,
)

__all__ = [
    "BORDERLINE_TASKS",
    "COMPLIANCES",
    "GATT_INSTRUCTIONS",
    "GATT_SIZE",
    "HARMS",
    "HELD_OUT_HARMS",
    "HELPFUL_REJECTIONS",
    "MAX_NAME_F1",
    "MAX_PAIR_F1",
    "NON_ANSWERS",
    "N_OBJECTS",
    "PARAPHRASE_OPENINGS",
    "PREFERENCE_SIZES",
    "PREF_HISTORY_RATE",
    "PREF_SYSTEM_RATE",
    "PROMPT_KIND_WEIGHTS",
    "PROMPT_SIZES",
    "PROMPT_SYSTEM_RATE",
    "REFUSALS",
    "SAFETY_MIX",
    "SAFE_TEMPLATES",
    "SFT_FALSE_REFUSAL_RATE",
    "SFT_HELPFUL_RATE",
    "SFT_KIND_WEIGHTS",
    "SFT_MULTI_TURN_RATE",
    "SFT_REFUSAL_RATE",
    "SFT_SIZE",
    "SFT_SYSTEM_RATE",
    "SFT_WRONG_SHARE",
    "SPLITS",
    "SYSTEM_PROMPTS",
    "TASK_TEMPLATES",
    "TERSE_REFUSAL",
    "Dialog",
    "GattPrompt",
    "GattRecord",
    "PreferenceRecord",
    "PromptRecord",
    "Question",
    "QuestionPool",
    "SftRecord",
    "World",
    "WorldObject",
    "all_questions",
    "apply_instruction",
    "builtin_eval_prompts",
    "builtin_gatt",
    "builtin_gatt_eval",
    "builtin_preferences",
    "builtin_prompts",
    "builtin_sft",
    "builtin_world",
    "compliance",
    "describe",
    "follows_instruction",
    "gatt_sampling_messages",
    "non_answer",
    "paraphrase",
    "preference_examples",
    "refusal",
    "sft_dialogs",
    "truncated",
    "wrong_answer",
]
