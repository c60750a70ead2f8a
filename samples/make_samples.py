"""Writes the bundled sample datasets: a customer-support intent classification task.

Each example's input_text carries the instruction and the message; output_text is the label.
The data is generated from templates with a fixed seed, so re-running this script rewrites the
same files byte for byte:

    python samples/make_samples.py

- ``support_intents_train.jsonl``: 320 training examples (80 per label);
- ``support_intents_eval.jsonl``: 60 evaluation examples (15 per label), no overlap with training.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

LABELS = ("billing", "shipping", "technical", "account")

INSTRUCTION = ("Classify the customer message into one of these categories: billing, shipping, "
               "technical, account. Answer with the category name only.")

TEMPLATES = {
    "billing": [
        "I was charged {n} times for my {product} order this month.",
        "Why does my invoice show ${amount} when the price was lower?",
        "Can I get a refund for the {product} subscription I cancelled?",
        "My credit card was billed but the payment shows as failed.",
        "Please explain the extra ${amount} fee on my last statement.",
        "I need a copy of the invoice for my {product} purchase.",
        "The discount code was not applied and I paid ${amount} too much.",
        "How do I change the card you charge for my {product} plan?",
        "You charged me after I cancelled my {product} trial.",
        "Is there a way to pay my {product} bill in installments?",
    ],
    "shipping": [
        "My {product} order has not arrived after {n} days.",
        "The tracking number for my {product} does not work.",
        "Can you ship my {product} to a different address?",
        "The box with my {product} arrived damaged.",
        "When will my {product} be delivered to {city}?",
        "The courier left my {product} at the wrong house in {city}.",
        "Do you offer express delivery of the {product} to {city}?",
        "My package with the {product} is stuck in customs for {n} days.",
        "I received someone else's parcel instead of my {product}.",
        "How much does shipping a {product} to {city} cost?",
    ],
    "technical": [
        "My {product} keeps crashing when I open the settings.",
        "The {product} app shows error code {code} on startup.",
        "After the update my {product} will not connect to wifi.",
        "The {product} battery drains in {n} hours.",
        "How do I reset my {product} to factory settings?",
        "The screen of my {product} flickers after {n} minutes.",
        "My {product} does not pair with my phone over bluetooth.",
        "The {product} firmware update fails at {n} percent.",
        "Sync between the {product} and the website stopped working.",
        "The {product} makes a loud noise and then turns off.",
    ],
    "account": [
        "I forgot the password for my account and the reset email never came.",
        "How do I change the email address on my account?",
        "Someone logged into my account from {city}.",
        "Please delete my account and all my data.",
        "I cannot log in because two-factor codes are not arriving.",
        "How can I merge my two accounts into one?",
        "My account was locked after {n} failed login attempts.",
        "I want to change the username on my account to {name}.",
        "Can I add {name} as a second user on my account?",
        "How do I download all the data stored in my account?",
    ],
}

SLOTS = {
    "product": ["laptop", "headphones", "smartwatch", "router", "tablet", "camera", "speaker",
                "e-reader", "printer", "monitor", "keyboard", "phone"],
    "n": [str(n) for n in range(2, 15)],
    "amount": [str(a) for a in (5, 9, 12, 15, 20, 25, 30, 45, 60, 99)],
    "city": ["Berlin", "Lyon", "Austin", "Osaka", "Lagos", "Lima", "Oslo", "Pune", "Quebec", "Perth"],
    "code": ["E12", "503", "0x1F", "E-404", "X9", "1007"],
    "name": ["Alex", "Maria", "Kenji", "Fatima", "Liam", "Priya"],
}

OPENERS = ["", "Hello, ", "Hi team, ", "Good morning. ", "Urgent: ", "Hey, "]


def _message(rng: random.Random, label: str) -> str:
    template = rng.choice(TEMPLATES[label])
    filled = template.format(**{slot: rng.choice(values) for slot, values in SLOTS.items()})
    opener = rng.choice(OPENERS)
    if opener.endswith(", ") and not filled.startswith("I "):
        filled = filled[0].lower() + filled[1:]
    return opener + filled


def make_examples(rng: random.Random, per_label: int, exclude: set[str]) -> list[dict]:
    """``per_label`` unique examples for every label, none of whose messages is in ``exclude``."""
    examples = []
    for label in LABELS:
        messages: list[str] = []
        while len(messages) < per_label:
            message = _message(rng, label)
            if message not in exclude and message not in messages:
                messages.append(message)
        examples += [{"input_text": f"{INSTRUCTION}\n\nMessage: {m}", "output_text": label}
                     for m in messages]
    rng.shuffle(examples)
    return examples


def main() -> None:
    rng = random.Random(20261126)
    here = Path(__file__).parent
    train = make_examples(rng, 80, exclude=set())
    seen = {e["input_text"].rsplit("Message: ", 1)[1] for e in train}
    evaluation = make_examples(rng, 15, exclude=seen)
    for name, examples in (("support_intents_train.jsonl", train),
                           ("support_intents_eval.jsonl", evaluation)):
        with open(here / name, "w", encoding="utf-8", newline="\n") as out:
            out.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in examples)
        print(f"wrote {len(examples)} examples to {here / name}")


if __name__ == "__main__":
    main()
