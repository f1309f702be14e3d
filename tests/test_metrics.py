"""Metric values against small hand-checked examples, English and Chinese; GSM8K answer extraction."""

from __future__ import annotations

import pytest

from qlora_lab.metrics import (
    bleu4,
    detect_language,
    gsm8k_accuracy,
    gsm8k_answer,
    last_number,
    normalize_number,
    rouge,
)


def test_rouge_english_hand_checked():
    # pred unigrams 3/3 in ref, ref has 6: F1 = 2*1*0.5/1.5 = 2/3; bigrams 2/2 vs 2/5: F1 = 4/7; LCS = 3: 2/3
    scores = rouge(["the cat sat"], ["the cat sat on the mat"])
    assert scores["rouge1"] == pytest.approx(200 / 3)
    assert scores["rouge2"] == pytest.approx(400 / 7)
    assert scores["rougeL"] == pytest.approx(200 / 3)
    assert rouge(["a b"], ["c d"])["rouge1"] == 0


def test_rouge_chinese_is_character_level():
    # 4 of 4 predicted characters in a 7-character reference: F1 = 2*(4/7)/(1+4/7) = 8/11
    scores = rouge(["我爱北京"], ["我爱北京天安门"], language="zh")
    assert scores["rouge1"] == pytest.approx(800 / 11)
    assert scores["rougeL"] == pytest.approx(800 / 11)
    # the English tokenizer would see no tokens at all in Chinese text
    assert rouge(["我爱北京"], ["我爱北京天安门"], language="en")["rouge1"] == 0


def test_rouge_is_the_mean_over_pairs():
    scores = rouge(["the cat sat", "a b"], ["the cat sat on the mat", "a b"])
    assert scores["rouge1"] == pytest.approx((200 / 3 + 100) / 2)


def test_bleu_hand_checked():
    assert bleu4(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100)
    # all n-gram precisions are 1; brevity penalty exp(1 - 7/6)
    assert bleu4(["the cat sat on the mat"], ["the cat sat on the mat today"]) == pytest.approx(
        100 * 2.718281828 ** (-1 / 6), rel=1e-4
    )
    # Chinese: the zh tokenizer splits characters; 4 of 7, brevity penalty exp(1 - 7/4)
    assert bleu4(["我爱北京"], ["我爱北京天安门"], language="zh") == pytest.approx(
        100 * 2.718281828 ** (-0.75), rel=1e-4
    )


def test_language_detection():
    assert detect_language(["保持健康的三个提示。", "hello"]) == "zh"
    assert detect_language(["Give three tips for staying healthy."]) == "en"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("#### 18", "18"),
        ("So she makes $18.\n#### 18", "18"),
        ("#### 1,000", "1000"),
        ("#### -5", "-5"),
        ("#### 3.50", "3.5"),
        ("#### 7.", "7"),
        ("#### $2,125.00", "2125"),
        ("#### 0.25", "0.25"),
        ("#### 12 apples", "12"),
        ("first #### 3 then #### 4", "4"),
        ("no marker 42", None),
        ("#### none", None),
    ],
)
def test_gsm8k_answer_extraction(text, expected):
    assert gsm8k_answer(text) == expected


def test_number_normalization_and_last_number():
    assert normalize_number("-0.0") == "0"
    assert last_number("She has 3 apples, then 1,200 more.") == "1200"
    assert last_number("nothing") is None


def test_gsm8k_accuracy_strict_and_lenient():
    refs = ["... #### 18", "... #### 1,000", "... #### -3", "... #### 2.5"]
    preds = ["so #### 18", "the answer is 1000", "#### -3.0", "#### 25"]
    acc = gsm8k_accuracy(preds, refs)
    assert acc["accuracy"] == 50  # 18 and -3 (the second has no marker, the last is wrong)
    assert acc["accuracy_lenient"] == 75  # + the unmarked 1000
    assert acc["answer_format_rate"] == 75
