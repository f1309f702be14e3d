"""Text metrics: ROUGE (rouge-score), BLEU-4 (sacrebleu), GSM8K answer accuracy. All scores are on a 0-100
scale.

Chinese text has no spaces and rouge-score's default tokenizer drops every non-ASCII character, so Chinese is
scored over characters (ROUGE) and with sacrebleu's `zh` tokenizer (BLEU), as is standard for Chinese.
"""

from __future__ import annotations

import re

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def detect_language(texts: list[str]) -> str:
    """`zh` when CJK characters make up a fifth or more of the non-space characters, else `en`."""
    text = "".join(texts)
    chars = [c for c in text if not c.isspace()]
    return "zh" if chars and len(CJK.findall(text)) / len(chars) >= 0.2 else "en"


class CharTokenizer:
    """rouge-score tokenizer for Chinese: every non-space character is a token (punctuation dropped)."""

    def tokenize(self, text: str) -> list[str]:
        return [c for c in text.lower() if not c.isspace() and (c.isalnum() or CJK.match(c))]


def rouge(predictions: list[str], references: list[str], language: str = "en") -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 over the pairs (0-100)."""
    tokenizer = CharTokenizer() if language == "zh" else None
    from rouge_score import (
        rouge_scorer,  # here, not at the top: a run scoring only accuracy needs neither package
    )

    scorer = rouge_scorer.RougeScorer(
        ["rouge1", "rouge2", "rougeL"], use_stemmer=language == "en", tokenizer=tokenizer
    )
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)
        for key in totals:
            totals[key] += scores[key].fmeasure
    n = max(len(predictions), 1)
    return {key: 100 * value / n for key, value in totals.items()}


def bleu4(predictions: list[str], references: list[str], language: str = "en") -> float:
    """Corpus BLEU-4 (sacrebleu, 0-100): the standard `13a` tokenizer, `zh` for Chinese."""
    import sacrebleu

    return sacrebleu.corpus_bleu(
        predictions, [references], tokenize="zh" if language == "zh" else "13a"
    ).score


def normalize_number(text: str) -> str | None:
    """'1,000' -> '1000', '$18.50' -> '18.5', '-3.0' -> '-3', '7.' -> '7'; None if there is no number."""
    match = NUMBER.search(text.replace("$", ""))
    if not match:
        return None
    number = match.group(0).replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    if number in ("-0", "", "-"):
        number = "0"
    return number


def gsm8k_answer(text: str) -> str | None:
    """The number after the last `####` (GSM8K's answer marker), normalized; None when there is no marker."""
    if "####" not in text:
        return None
    return normalize_number(text.rsplit("####", 1)[1])


def last_number(text: str) -> str | None:
    """The last number anywhere in the text: a lenient fallback for models that skip `####`."""
    numbers = NUMBER.findall(text.replace("$", ""))
    return normalize_number(numbers[-1]) if numbers else None


def gsm8k_accuracy(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Strict: the prediction's `#### N` equals the reference's. Lenient: its last number does (0-100)."""
    gold = [gsm8k_answer(r) for r in references]
    strict = sum(
        gsm8k_answer(p) is not None and gsm8k_answer(p) == g for p, g in zip(predictions, gold, strict=True)
    )
    lenient = sum(last_number(p) == g for p, g in zip(predictions, gold, strict=True))
    n = max(len(predictions), 1)
    return {
        "accuracy": 100 * strict / n,
        "accuracy_lenient": 100 * lenient / n,
        "answer_format_rate": 100 * sum("####" in p for p in predictions) / n,
    }
