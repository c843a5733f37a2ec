"""Writes data/tiny/{train,test}.jsonl: the embedded preference task that `--model tiny` learns.

The task: the prompt asks for a short list of words in UPPER or lower case. The better reply writes every word
in the asked case; the worse one writes k of the n words in the other case (k from 1 to n). Both replies are
equally long and use the same letters, so a random model prefers neither (held-out reward accuracy about 0.5);
pairs with k = n can only be told apart by reading the instruction.

Scores follow the UltraFeedback-binarized schema and, like real judge scores, are noisy: a reply's true
quality is 10 x the share of its words in the asked case, the judge adds Gaussian noise (σ = JUDGE_NOISE), and
the reply with the higher judged score is `chosen`. So a pair with a small score gap is often labelled the
wrong way round and a pair with a large gap almost never: 188 of the 1600 training labels (12%) are wrong,
176 of them in the lower half of gaps, so `--select_frac 0.5` keeps pairs with 1.5% wrong labels. Held-out rows are
labelled and scored by true quality, so held-out reward accuracy measures the rule itself.

    python data/tiny/make_tiny.py
"""

import json
import random
from pathlib import Path

WORDS = (
    "apple river stone cloud green quick seven paper light music table house bread smile ocean "
    "tiger plant chair north sugar dream field glass honey lemon metal night orange pilot quiet "
    "robin sand train voice water yellow zebra amber candle forest garden island jacket kettle"
).split()
ASK = {
    "upper": ["Say in UPPER case:", "Shout these words:", "Write in capitals:"],
    "lower": ["Say in lower case:", "Whisper these words:", "Write in small letters:"],
}
JUDGE_NOISE = 3.5  # σ of the judge's score noise, on the 0-10 scale


def write_in_case(words: list[str], case: str, n_wrong: int, rng: random.Random) -> str:
    """The words in the asked case, except n_wrong of them (chosen at random) in the other case."""
    wrong = set(rng.sample(range(len(words)), n_wrong))
    upper = [(case == "upper") != (i in wrong) for i in range(len(words))]
    return " ".join(w.upper() if up else w.lower() for w, up in zip(words, upper))


def make_row(rng: random.Random, judged: bool) -> dict:
    case = rng.choice(["upper", "lower"])
    words = rng.sample(WORDS, rng.randint(2, 5))
    prompt = f"{rng.choice(ASK[case])} {' '.join(words).title()}"  # title case: copying favours neither reply
    n_wrong = rng.randint(1, len(words))
    good, bad = write_in_case(words, case, 0, rng), write_in_case(words, case, n_wrong, rng)
    good_score, bad_score = 10.0, 10.0 * (1 - n_wrong / len(words))
    if judged:
        good_score, bad_score = good_score + rng.gauss(0, JUDGE_NOISE), bad_score + rng.gauss(0, JUDGE_NOISE)
    good_score, bad_score = round(good_score, 1), round(bad_score, 1)
    if bad_score > good_score:  # the judge got this pair wrong: the worse reply is labelled chosen
        good, bad, good_score, bad_score = bad, good, bad_score, good_score
    return {
        "prompt": prompt,
        "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": good}],
        "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": bad}],
        "score_chosen": good_score,
        "score_rejected": bad_score,
    }


def main() -> None:
    rng = random.Random(0)
    folder = Path(__file__).parent
    for split, n, judged in (("train", 1600, True), ("test", 200, False)):
        rows = [make_row(rng, judged) for _ in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
