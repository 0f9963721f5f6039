"""Deterministic chat data for the training benchmark.

Built from Banking77 (../shared/data/banking77/train.csv: customer query ->
intent) when that file is present, otherwise from synthetic queries. Three
kinds of conversation give a realistic spread of lengths:

- single: one query, one answer naming the intent (a few dozen tokens);
- follow-up: a support chat of a few queries, each answered (hundreds of tokens);
- long: a long support session, or a batch of tickets triaged in one answer
  (up to about 1,000 tokens).

Lengths are measured with the model's tokenizer while the conversations are
assembled, so no example exceeds the budget it was drawn for. Nothing from the
shared folder is written into the repository: callers write the JSONL files
wherever they like (the benchmark uses a temporary folder).
"""

import csv
import random
from pathlib import Path

BANKING77_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77" / "train.csv"

SYSTEM_PROMPTS = (
    "You are the support assistant of an online bank. Name the intent of each customer request, then help.",
    "You triage customer messages for a banking app. Always state the intent label first.",
)

_TEAMS = (
    ("card", "Cards"),
    ("pin", "Cards"),
    ("contactless", "Cards"),
    ("atm", "Cash"),
    ("cash", "Cash"),
    ("transfer", "Payments"),
    ("payment", "Payments"),
    ("direct_debit", "Payments"),
    ("top_up", "Top-ups"),
    ("exchange", "Foreign exchange"),
    ("currenc", "Foreign exchange"),
    ("fiat", "Foreign exchange"),
    ("verif", "Identity"),
    ("identity", "Identity"),
    ("passcode", "Security"),
    ("compromised", "Security"),
    ("refund", "Disputes"),
    ("charge", "Disputes"),
)

_OPENINGS = (
    "Thanks for reaching out.",
    "I can help with that.",
    "Sorry to hear about this.",
    "Good question.",
    "Let me look into it.",
    "Understood.",
)

_NEXT_STEPS = (
    "Open the app, go to Help, and pick the matching topic so the form is pre-filled.",
    "I have routed your request to the {team} team; they usually answer within one business day.",
    "You can check the current status under Account > Activity; it refreshes every few minutes.",
    "If this does not resolve it, reply here with the date and amount involved and we will investigate.",
    "Please do not share your full card number or PIN in this chat.",
    "Most cases like this are settled automatically within 2-3 working days.",
)

_SYNTHETIC_TOPICS = (
    ("card_arrival", "Where is my new card? I ordered it {n} days ago."),
    ("exchange_rate", "What exchange rate do you use for {cur}?"),
    ("pending_transfer", "My transfer of {n}0 {cur} has been pending since yesterday."),
    ("lost_or_stolen_card", "I think my card was stolen while travelling, what should I do?"),
    ("top_up_failed", "Why did my top-up of {n}0 {cur} fail?"),
    ("pin_blocked", "I typed my PIN wrong {n} times and now it is blocked."),
    ("refund_not_showing_up", "A shop refunded me {n} days ago but I don't see the money."),
    ("card_payment_fee_charged", "Why was I charged a fee for paying by card in {cur}?"),
)


def load_rows(path: Path | None = None, *, seed: int = 0) -> tuple[list[tuple[str, str]], str]:
    """Return (query, intent) pairs in a seeded order and where they came from."""
    path = Path(path) if path else BANKING77_TRAIN
    if path.is_file():
        with open(path, encoding="utf-8", newline="") as handle:
            rows = [
                (row["text"].strip(), row["category"].strip()) for row in csv.DictReader(handle) if row["text"].strip()
            ]
        source = str(path)
    else:
        rng = random.Random(f"synthetic/{seed}")
        rows = []
        for _ in range(4000):
            intent, pattern = rng.choice(_SYNTHETIC_TOPICS)
            rows.append((pattern.format(n=rng.randint(2, 9), cur=rng.choice(("EUR", "USD", "GBP", "CHF"))), intent))
        source = f"synthetic (Banking77 not found at {path})"
    random.Random(f"rows/{seed}").shuffle(rows)
    return rows, source


def _readable(intent: str) -> str:
    return intent.replace("_", " ")


def _team(intent: str) -> str:
    return next((team for key, team in _TEAMS if key in intent), "Accounts")


def answer(query: str, intent: str, rng: random.Random) -> str:
    """An assistant reply that names the intent, then helps a little."""
    steps = rng.sample(_NEXT_STEPS, k=rng.randint(1, 2))
    help_text = " ".join(step.format(team=_team(intent)) for step in steps)
    return f"Intent: {intent}\n{rng.choice(_OPENINGS)} This is about {_readable(intent)}. {help_text}"


def triage(tickets: list[tuple[str, str]]) -> list[dict]:
    """One user message holding many tickets, one answer labelling each."""
    listing = "\n".join(f"{i}. {query}" for i, (query, _) in enumerate(tickets, start=1))
    lines = [
        f"{i}. {intent} - {_readable(intent)}; route to {_team(intent)}."
        for i, (_, intent) in enumerate(tickets, start=1)
    ]
    counts = {}
    for _, intent in tickets:
        counts[_team(intent)] = counts.get(_team(intent), 0) + 1
    busiest = max(counts, key=counts.get)
    summary = f"{len(tickets)} tickets; the {busiest} team has the most ({counts[busiest]})."
    return [
        {"role": "user", "content": f"Label the intent of each of these customer tickets:\n{listing}"},
        {"role": "assistant", "content": "\n".join(lines) + f"\n\nSummary: {summary}"},
    ]


class _Rows:
    def __init__(self, rows):
        self.rows, self.next = rows, 0

    def take(self) -> tuple[str, str]:
        row = self.rows[self.next % len(self.rows)]
        self.next += 1
        return row


def build_conversations(
    count: int, rows: list[tuple[str, str]], count_tokens, *, seed: int, max_tokens: int = 1000
) -> list[dict]:
    """count conversations ({"messages": [...]}) whose lengths spread from a few dozen to max_tokens tokens.

    count_tokens(messages) -> int measures a conversation as the trainer will see it.
    """
    rng = random.Random(f"conversations/{seed}")
    source = _Rows(rows)
    conversations = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.5:
            query, intent = source.take()
            # Some replies are the bare label, as in a plain classification fine-tune.
            reply = f"Intent: {intent}" if rng.random() < 0.4 else answer(query, intent, rng)
            messages = [{"role": "user", "content": query}, {"role": "assistant", "content": reply}]
        elif kind < 0.8:
            messages = _grow_chat(rng, source, count_tokens, target=rng.randint(150, 450))
        elif rng.random() < 0.5:
            messages = _grow_chat(rng, source, count_tokens, target=rng.randint(500, max_tokens))
        else:
            messages = _grow_triage(rng, source, count_tokens, target=rng.randint(500, max_tokens))
        conversations.append({"messages": messages})
    return conversations


def _grow_chat(rng, source: _Rows, count_tokens, *, target: int) -> list[dict]:
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.5 else []
    while True:
        query, intent = source.take()
        turn = [{"role": "user", "content": query}, {"role": "assistant", "content": answer(query, intent, rng)}]
        if len(messages) > 1 and count_tokens(messages + turn) > target:
            return messages
        messages += turn
        if count_tokens(messages) >= target:
            return messages


def _grow_triage(rng, source: _Rows, count_tokens, *, target: int) -> list[dict]:
    tickets = [source.take(), source.take()]
    while True:
        longer = tickets + [source.take()]
        if count_tokens(triage(longer)) > target:
            return triage(tickets)
        tickets = longer
