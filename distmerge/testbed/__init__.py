"""A family of real tiny causal LMs trained locally on CPU, to test and benchmark merges.

No model hub is reachable where distmerge is developed, so the testbed trains its own: a character-level
Qwen2 base, one SFT specialist per synthetic task, and a weak SFT + GRPO pair whose difference is a
reasoning vector. `build_family` writes them as Hugging Face folders with a `family.json` manifest.
"""

from distmerge.testbed.evaluate import evaluate
from distmerge.testbed.family import FamilyManifest, build_family
from distmerge.testbed.tasks import TASKS, Example, eval_prompts, extract_answer, score

__all__ = ["TASKS", "Example", "FamilyManifest", "build_family", "eval_prompts", "evaluate", "extract_answer",
           "score"]
