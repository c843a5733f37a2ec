"""Writes data/tiny/{train,test}.jsonl: the embedded preference task that `--model tiny` learns.

The task: the prompt asks for a short list of words in UPPER or lower case; the chosen reply
follows the instruction, the rejected reply has the same words in the other case. Both replies
are equally long and use the same letters, so a random model prefers neither (held-out reward
accuracy about 0.5), and the only way to tell them apart is to read the instruction in the prompt.
Held-out rows use the same vocabulary in new combinations.

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


def make_row(rng: random.Random) -> dict:
    case = rng.choice(["upper", "lower"])
    words = " ".join(rng.sample(WORDS, rng.randint(2, 5)))
    prompt = f"{rng.choice(ASK[case])} {words.title()}"  # title case: copying the prompt favours neither reply
    upper, lower = words.upper(), words.lower()
    chosen, rejected = (upper, lower) if case == "upper" else (lower, upper)
    return {
        "prompt": prompt,
        "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}],
        "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": rejected}],
    }


def main() -> None:
    rng = random.Random(0)
    folder = Path(__file__).parent
    for split, n in (("train", 1600), ("test", 200)):
        rows = [make_row(rng) for _ in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
