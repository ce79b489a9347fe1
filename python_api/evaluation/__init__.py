"""Attack success rate (ASR) and over-refusal evaluation, one module per job: judges (refusal lists, model and
knowledge judges, verdicts, the three labels), attacks (one-word, FigStep), generation (batched greedy decoding),
metrics (ASR, over-refusal, utility), report (Markdown, chart, JSON) and evaluator (evaluate(), which runs them);
asr_command holds the `asr` command (its checks and its run), which cli.py dispatches to.

Every public name but asr_command's is re-exported here, so `unlearn_engine.api.evaluation.X` keeps working;
the code lives in the module of its job.
"""
from unlearn_engine.api.evaluation.attacks import (
    ATTACKS,
    FIGSTEP_PROMPT,
    ONE_WORD_SWAPS,
    figstep_text,
    one_word_rephrase,
    render_typographic,
)
from unlearn_engine.api.evaluation.evaluator import evaluate
from unlearn_engine.api.evaluation.generation import generate, image_slot
from unlearn_engine.api.evaluation.judges import (
    COMPLIED,
    DEGENERATE,
    GCG_REFUSALS,
    REFUSAL_LISTS,
    REFUSED,
    RELEVANCE_TEMPLATE,
    SAFETY_MIRAGE_EXACT,
    SAFETY_MIRAGE_IRRELEVANT,
    SAFETY_TEMPLATE,
    VERDICTS,
    VLGUARD_PHRASES,
    VLGUARD_REFUSALS,
    Judge,
    KnowledgeJudge,
    ModelJudge,
    RefusalJudge,
    check_template,
    classify,
    degenerate_reason,
    fill_template,
    parse_safety_mirage,
    parse_verdict,
    safety_mirage_judge_prompt,
    safety_mirage_refusals,
)
from unlearn_engine.api.evaluation.metrics import (
    BENIGN_CHECK,
    attack_success_rate,
    has_groups,
    over_refusal_rate,
    per_query_asr,
    per_query_over_refusal,
    utility_score,
)
from unlearn_engine.api.evaluation.report import bar_chart, markdown_table, write_json

__all__ = [
    "ATTACKS", "BENIGN_CHECK", "COMPLIED", "DEGENERATE", "FIGSTEP_PROMPT", "GCG_REFUSALS", "ONE_WORD_SWAPS",
    "REFUSAL_LISTS", "REFUSED", "RELEVANCE_TEMPLATE", "SAFETY_MIRAGE_EXACT", "SAFETY_MIRAGE_IRRELEVANT",
    "SAFETY_TEMPLATE", "VERDICTS", "VLGUARD_PHRASES", "VLGUARD_REFUSALS", "Judge", "KnowledgeJudge", "ModelJudge",
    "RefusalJudge", "attack_success_rate", "bar_chart", "check_template", "classify", "degenerate_reason",
    "evaluate", "figstep_text", "fill_template", "generate", "has_groups", "image_slot", "markdown_table",
    "one_word_rephrase", "over_refusal_rate", "parse_safety_mirage", "parse_verdict", "per_query_asr",
    "per_query_over_refusal", "render_typographic", "safety_mirage_judge_prompt", "safety_mirage_refusals",
    "utility_score", "write_json",
]
