"""EvalAI answer normalisation and the VQA soft accuracy, as LLaVA's ``llava/eval/m4c_evaluator.py``
(``EvalAIAnswerProcessor`` + ``TextVQAAccuracyEvaluator``, itself from MMF/pythia) computes them.

Quirks kept on purpose (they change numbers):
- ``word_tokenize`` first: lower-case, delete every ``,`` and ``?``, ``'s`` -> `` 's``, strip.
- punctuation: for each mark, if it is followed or preceded by a space *in the input* (or a
  digit,digit comma exists - never after the comma deletion above), it is deleted, otherwise
  replaced by a space; the test looks at the original text, the replacements accumulate.
- periods: the regex is ``(?!<=\\d)(\\.)(?!\\d)`` - a typo for a look-behind, so it only protects
  periods *followed* by a digit ("3.5" keeps its period, "3." loses it) - and ``re.UNICODE`` is
  passed positionally as ``count``, so at most 32 periods are removed.
- number words "none"/"zero".."ten" -> digits, articles a/an/the dropped, then the contraction
  table (including its oddity "somebody'd" -> "somebodyd").
- accuracy of a prediction = mean over the 10 leave-one-out subsets of the (normalised) human
  answers of min(1, matches/3); exactly 10 human answers are required.
"""
from __future__ import annotations

import re

from ckd_eval.common import EvalError

_CONTRACTION_PAIRS = (
    "aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've|"
    "couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've|"
    "hadn'tve hadn't've|hasnt hasn't|havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's|"
    "howd how'd|howll how'll|hows how's|Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd|"
    "itd've it'd've|it'dve it'd've|itll it'll|let's let's|maam ma'am|mightnt mightn't|"
    "mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've|"
    "neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at|"
    "'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've|she's she's|shouldve should've|"
    "shouldnt shouldn't|shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd|"
    "somebodyd've somebody'd've|somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's|"
    "someoned someone'd|someoned've someone'd've|someone'dve someone'd've|someonell someone'll|"
    "someones someone's|somethingd something'd|somethingd've something'd've|"
    "something'dve something'd've|somethingll something'll|thats that's|thered there'd|"
    "thered've there'd've|there'dve there'd've|therere there're|theres there's|theyd they'd|"
    "theyd've they'd've|they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas|"
    "wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've|werent weren't|whatll what'll|whatre what're|"
    "whats what's|whatve what've|whens when's|whered where'd|wheres where's|whereve where've|whod who'd|"
    "whod've who'd've|who'dve who'd've|wholl who'll|whos who's|whove who've|whyll why'll|whyre why're|"
    "whys why's|wont won't|wouldve would've|wouldnt wouldn't|wouldnt've wouldn't've|"
    "wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll|yall'd've y'all'd've|"
    "y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've|you'dve you'd've|"
    "youll you'll|youre you're|youve you've"
)
CONTRACTIONS = dict(pair.split(" ") for pair in _CONTRACTION_PAIRS.split("|"))
NUMBER_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
              "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: see the module docstring
COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
PUNCTUATIONS = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                ",", "?", "!")
_PERIOD_STRIP_COUNT = int(re.UNICODE)  # the official passes re.UNICODE (=32) where `count` goes


def _punctuation(text: str) -> str:
    out = text
    comma_between_digits = COMMA_STRIP.search(text) is not None
    for p in PUNCTUATIONS:
        if (p + " ") in text or (" " + p) in text or comma_between_digits:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _digits_articles(text: str) -> str:
    words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """``EvalAIAnswerProcessor()(answer)``."""
    s = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    s = s.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(s))


def answer_scores(gt_answers: list[str]) -> dict[str, float]:
    """Soft score of every distinct (normalised) human answer: mean over the leave-one-out subsets
    of min(1, matches / 3)."""
    answers = [normalize_answer(a) for a in gt_answers]
    if len(answers) != 10:
        raise EvalError(f"VQA accuracy needs exactly 10 human answers per question, got {len(answers)}")
    scores = {}
    for cand in set(answers):
        accs = []
        for i in range(len(answers)):
            matches = sum(1 for j, a in enumerate(answers) if j != i and a == cand)
            accs.append(min(1.0, matches / 3))
        scores[cand] = sum(accs) / len(accs)
    return scores


def vqa_accuracy(pred: str, gt_answers: list[str]) -> float:
    return answer_scores(gt_answers).get(normalize_answer(pred), 0.0)
