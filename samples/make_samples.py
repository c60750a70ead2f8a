"""Writes the bundled sample datasets: customer-support intents (text) and a support chat.

The data is generated from templates with a fixed seed, so re-running this script rewrites the
same files byte for byte:

    python samples/make_samples.py

Text (``tune-large-model``, ``make run``): each example's input_text carries the instruction and
the message; output_text is the label.

- ``support_intents_train.jsonl``: 320 training examples (80 per label);
- ``support_intents_eval.jsonl``: 60 evaluation examples (15 per label), no overlap with training.

Chat (``tune-large-chat-model``, ``make run-chat``): multi-turn support conversations in Vertex's
chat format, for the pipeline's ``default_context`` (:data:`DEFAULT_CONTEXT`). The house style,
which the base model does not follow, is that every assistant reply ends with the line
:data:`SIGN_OFF`. A tenth of the conversations carry their own ``context`` (it overrides the
default).

- ``support_chat_train.jsonl``: 240 conversations of 1 to 3 turns;
- ``support_chat_heldout.jsonl``: 20 held-out conversations (their first messages are not in
  the training data); the last assistant reply is the reference, the turns before it the prompt.
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


DEFAULT_CONTEXT = ("You are the support assistant of Pebble, an online shop for electronics. "
                   "Be friendly and brief.")
SIGN_OFF = "Warm regards, the Pebble crew"
BUSINESS_CONTEXT = ("You are the support assistant of Pebble Business, the shop's service for "
                    "companies. Be precise and brief.")

REPLIES = {
    "billing": [
        "I'm sorry about the billing trouble. I have opened a ticket and our billing team will "
        "review the charge within 2 business days.",
        "Thanks for telling us. I have asked our billing team to check the payment; any amount "
        "charged in error is refunded to your card.",
        "I understand. You can see every charge under Account > Billing, and I have flagged this "
        "one for a refund review.",
    ],
    "shipping": [
        "I'm sorry for the wait. I have asked the courier for an update and will send you the new "
        "delivery date by email today.",
        "Thanks for letting us know. I have opened a delivery case; if the parcel is lost we send a "
        "replacement free of charge.",
        "I understand. Delivery usually takes 3 to 5 days, and I have added a note to your order "
        "so the courier calls you first.",
    ],
    "technical": [
        "Sorry about that. Please restart the device and install the latest update from "
        "Settings > System; if the problem stays, we will repair it under warranty.",
        "I can help. Hold the power button for 10 seconds to reset it, then set it up again from "
        "the app.",
        "Thanks for the details. Please send us the device's serial number and I will open a "
        "repair ticket right away.",
    ],
    "account": [
        "I can help with that. For your security I have sent a verification link to the email on "
        "your account; please open it within 24 hours.",
        "No problem. You can change this under Account > Profile, and I have sent you a link that "
        "takes you straight there.",
        "Thanks for reaching out. I have locked the account for safety and sent you a link to set "
        "a new password.",
    ],
}

FOLLOW_UPS = [
    ("How long will that take?",
     "Usually 2 to 3 business days. You will get an email as soon as it is done."),
    ("Do I need to do anything else?", "No, nothing else for now. We will contact you if we need "
                                       "more information."),
    ("Can I talk to a person instead?", "Of course. You can call us on weekdays from 9 to 17, or "
                                        "reply here and a colleague will take over."),
    ("Will I get a confirmation?", "Yes, you will receive a confirmation email within the hour."),
    ("Thanks, that helps.", "You're welcome, I'm glad I could help."),
    ("Is there a fee for this?", "No, this is free of charge for you."),
]


def signed(reply: str) -> str:
    """A reply in the house style: the reply, a blank line, the sign-off."""
    return f"{reply}\n\n{SIGN_OFF}"


def make_conversations(rng: random.Random, count: int, exclude: set[str],
                       own_context_share: float) -> list[dict]:
    """``count`` chat examples of 1 to 3 turns, their first messages unique and not in
    ``exclude``; about ``own_context_share`` of them carry their own context."""
    conversations, openers = [], set()
    while len(conversations) < count:
        label = LABELS[len(conversations) % len(LABELS)]
        first = _message(rng, label)
        if first in exclude or first in openers:
            continue
        openers.add(first)
        messages = [{"author": "user", "content": first},
                    {"author": "assistant", "content": signed(rng.choice(REPLIES[label]))}]
        for question, answer in rng.sample(FOLLOW_UPS, rng.choice((0, 1, 1, 2))):
            messages += [{"author": "user", "content": question},
                         {"author": "assistant", "content": signed(answer)}]
        example = {"messages": messages}
        if rng.random() < own_context_share:
            example = {"context": BUSINESS_CONTEXT, **example}
        conversations.append(example)
    rng.shuffle(conversations)
    return conversations


def write_jsonl(path: Path, examples: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as out:
        out.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in examples)
    print(f"wrote {len(examples)} examples to {path}")


def main() -> None:
    rng = random.Random(20261126)
    here = Path(__file__).parent
    train = make_examples(rng, 80, exclude=set())
    seen = {e["input_text"].rsplit("Message: ", 1)[1] for e in train}
    evaluation = make_examples(rng, 15, exclude=seen)
    write_jsonl(here / "support_intents_train.jsonl", train)
    write_jsonl(here / "support_intents_eval.jsonl", evaluation)

    chat_rng = random.Random(20261127)
    chat_train = make_conversations(chat_rng, 240, exclude=set(), own_context_share=0.1)
    seen = {c["messages"][0]["content"] for c in chat_train}
    write_jsonl(here / "support_chat_train.jsonl", chat_train)
    write_jsonl(here / "support_chat_heldout.jsonl",
                make_conversations(chat_rng, 20, exclude=seen, own_context_share=0.0))


if __name__ == "__main__":
    main()
