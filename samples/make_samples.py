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

# Per label: (message template, cue). The cue says what a message of that template is about; the
# distillation sample's rationales are written from it (:func:`rationale`).
TEMPLATES = {
    "billing": [
        ("I was charged {n} times for my {product} order this month.",
         "being charged several times"),
        ("Why does my invoice show ${amount} when the price was lower?",
         "an invoice amount that is too high"),
        ("Can I get a refund for the {product} subscription I cancelled?",
         "a refund for a cancelled subscription"),
        ("My credit card was billed but the payment shows as failed.",
         "a card charged for a failed payment"),
        ("Please explain the extra ${amount} fee on my last statement.",
         "an extra fee on a statement"),
        ("I need a copy of the invoice for my {product} purchase.", "a copy of an invoice"),
        ("The discount code was not applied and I paid ${amount} too much.",
         "a discount code that was not applied"),
        ("How do I change the card you charge for my {product} plan?",
         "changing the card that is charged"),
        ("You charged me after I cancelled my {product} trial.",
         "a charge after a cancelled trial"),
        ("Is there a way to pay my {product} bill in installments?",
         "paying a bill in installments"),
    ],
    "shipping": [
        ("My {product} order has not arrived after {n} days.", "an order that has not arrived"),
        ("The tracking number for my {product} does not work.",
         "a tracking number that does not work"),
        ("Can you ship my {product} to a different address?", "shipping to a different address"),
        ("The box with my {product} arrived damaged.", "a box that arrived damaged"),
        ("When will my {product} be delivered to {city}?", "when an order will be delivered"),
        ("The courier left my {product} at the wrong house in {city}.",
         "a parcel left at the wrong house"),
        ("Do you offer express delivery of the {product} to {city}?", "express delivery"),
        ("My package with the {product} is stuck in customs for {n} days.",
         "a package stuck in customs"),
        ("I received someone else's parcel instead of my {product}.",
         "receiving someone else's parcel"),
        ("How much does shipping a {product} to {city} cost?", "the cost of shipping"),
    ],
    "technical": [
        ("My {product} keeps crashing when I open the settings.", "a device that keeps crashing"),
        ("The {product} app shows error code {code} on startup.", "an error code in an app"),
        ("After the update my {product} will not connect to wifi.",
         "a device that will not connect to wifi"),
        ("The {product} battery drains in {n} hours.", "a battery that drains quickly"),
        ("How do I reset my {product} to factory settings?",
         "resetting a device to factory settings"),
        ("The screen of my {product} flickers after {n} minutes.", "a flickering screen"),
        ("My {product} does not pair with my phone over bluetooth.",
         "bluetooth pairing that fails"),
        ("The {product} firmware update fails at {n} percent.", "a firmware update that fails"),
        ("Sync between the {product} and the website stopped working.",
         "sync that stopped working"),
        ("The {product} makes a loud noise and then turns off.", "a device that turns itself off"),
    ],
    "account": [
        ("I forgot the password for my account and the reset email never came.",
         "a forgotten password"),
        ("How do I change the email address on my account?",
         "changing the email address of an account"),
        ("Someone logged into my account from {city}.", "a login from an unknown place"),
        ("Please delete my account and all my data.", "deleting an account and its data"),
        ("I cannot log in because two-factor codes are not arriving.",
         "two-factor codes that do not arrive"),
        ("How can I merge my two accounts into one?", "merging two accounts"),
        ("My account was locked after {n} failed login attempts.",
         "an account locked after failed logins"),
        ("I want to change the username on my account to {name}.", "changing a username"),
        ("Can I add {name} as a second user on my account?", "adding a second user to an account"),
        ("How do I download all the data stored in my account?",
         "downloading the data of an account"),
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


def _message_and_cue(rng: random.Random, label: str) -> tuple[str, str]:
    template, cue = rng.choice(TEMPLATES[label])
    filled = template.format(**{slot: rng.choice(values) for slot, values in SLOTS.items()})
    opener = rng.choice(OPENERS)
    if opener.endswith(", ") and not filled.startswith("I "):
        filled = filled[0].lower() + filled[1:]
    return opener + filled, cue


def _message(rng: random.Random, label: str) -> str:
    return _message_and_cue(rng, label)[0]


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


ROUTING_TASK = "Route to a team: "
LABEL_REASONS = {
    "billing": "money matters go to billing",
    "shipping": "deliveries go to shipping",
    "technical": "faulty devices and apps go to technical",
    "account": "logins and profiles go to account",
}


def rationale(cue: str, label: str) -> str:
    """The hand-written reasoning from a message's cue to its label."""
    return f"It is about {cue}; {LABEL_REASONS[label]}."


def make_routing_examples(rng: random.Random, per_label: int, exclude: set[str]) -> list[dict]:
    """``per_label`` routing examples for every label (input_text, output_text and, for the
    sample's own use, the rationale), their messages unique and not in ``exclude``."""
    examples, messages = [], set()
    for label in LABELS:
        count = 0
        while count < per_label:
            message, cue = _message_and_cue(rng, label)
            if message in exclude or message in messages:
                continue
            messages.add(message)
            examples.append({"input_text": ROUTING_TASK + message, "output_text": label,
                             "rationale": rationale(cue, label)})
            count += 1
    rng.shuffle(examples)
    return examples


def distillation_dataset(examples: list[dict], labeled: int, explained: int) -> list[dict]:
    """The distillation training set: the first ``labeled`` examples keep their label (the first
    ``explained`` of them also their rationale, the teacher's demonstrations); the others are
    unlabeled (input_text only): the teacher labels them."""
    return [{"input_text": e["input_text"], "output_text": e["output_text"],
             **({"rationale": e["rationale"]} if number < explained else {})}
            if number < labeled else {"input_text": e["input_text"]}
            for number, e in enumerate(examples)]


TEACHER_TRAINING_SHOTS = 2


def teacher_training_set(rng: random.Random, examples: list[dict]) -> list[dict]:
    """Text examples that teach the embedded model to be the distillation teacher: the
    generate_rationales component's own few-shot prompts (demonstrations drawn from
    ``examples``) as input_text, and as output_text the reply its parser reads: ``Rationale:``
    then ``Answer:`` for an answer request (three in four), ``Rationale:`` alone for an explain
    request (the answer is in the prompt). The prompts show ``TEACHER_TRAINING_SHOTS``
    demonstrations, one fewer than the component's default: shorter prompts tune faster, and
    the tuned teacher follows the format with three as well."""
    from components.generate_rationales.examples import DistillationExample
    from components.generate_rationales.prompting import ANSWER, EXPLAIN, build_request

    pool = [DistillationExample(index, index + 1, e["input_text"], e["output_text"],
                                e["rationale"]) for index, e in enumerate(examples)]
    training = []
    for example in pool:
        mode = EXPLAIN if rng.random() < 0.25 else ANSWER
        request = build_request(pool, example, mode, few_shot_count=TEACHER_TRAINING_SHOTS,
                                seed=rng.randrange(1000))
        reply = f"Rationale: {example.rationale}"
        if mode == ANSWER:
            reply += f"\nAnswer: {example.output_text}"
        training.append({"input_text": request.messages[-1]["content"], "output_text": reply})
    return training


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

    distill_rng = random.Random(20261129)
    routing = make_routing_examples(distill_rng, 20, exclude=set())
    seen = {e["input_text"] for e in routing}
    held_out = make_routing_examples(distill_rng, 8, exclude=seen)
    seen |= {e["input_text"] for e in held_out}
    teacher_pool = make_routing_examples(distill_rng, 40, exclude=seen)
    write_jsonl(here / "distill_train.jsonl", distillation_dataset(routing, 32, 8))
    write_jsonl(here / "distill_eval.jsonl",
                [{"input_text": e["input_text"], "output_text": e["output_text"]}
                 for e in held_out])
    write_jsonl(here / "distill_teacher_train.jsonl",
                teacher_training_set(distill_rng, teacher_pool))


if __name__ == "__main__":
    main()
