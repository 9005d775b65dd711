"""The documents and questions `libra bench knowledge` measures retrieval quality on.

Made up for the benchmark (no model has read them): a handful of documents on unrelated
subjects, each fact asked about once in other words than the document's, with the phrase of
the chunk that answers it.
"""

from __future__ import annotations

__all__ = ["DOCUMENTS", "QUESTIONS"]

DOCUMENTS: dict[str, str] = {
    "bakery.md": """# Marlow Street Bakery

## Opening hours
The bakery opens at seven in the morning on weekdays and at nine on Sundays. It closes at six.

## Bread
Sourdough is baked every morning with a starter named Gertrude that is eleven years old.
Rye loaves are only sold on Fridays.

## Orders
Birthday cakes must be ordered three days ahead, by telephone or at the counter.
""",
    "trains.md": """# Northern Valley Railway

## Tickets
A day return costs fourteen euros; children under twelve travel free with an adult.

## Bicycles
Bicycles ride in the last carriage, at most six per train, and must be booked online.

## Delays
When a train is more than thirty minutes late, the fare is refunded at the station office.
""",
    "garden.md": """# Allotment rules

## Water
Hoses are forbidden in July and August; members fill watering cans from the blue tanks.

## Compost
Compost bays are emptied in October. No cooked food or meat goes into the compost.

## Bees
The two beehives by the north fence belong to Ana Duarte, who sells the honey in September.
""",
    "server.md": """# Guild rules of the Quiet Owls server

## Voice channels
Music bots may play only in the channel called Lounge, and never after midnight.

## Roles
The Archivist role is given after thirty days of membership and lets a person pin messages.

## Events
Movie night is every second Thursday; the film is chosen by a poll on Monday.
""",
    "laptop.md": """# Field laptop handbook

## Battery
The battery lasts about nine hours; keep it between twenty and eighty percent when stored.

## Repairs
A cracked screen is repaired by the workshop on the third floor, within two working days.

## Passwords
Passwords are changed every ninety days, and a new one may not repeat the last five.
""",
}

# (question, a phrase of the chunk that answers it)
QUESTIONS: list[tuple[str, str]] = [
    ("What time can I buy bread on a Sunday morning?", "at nine on Sundays"),
    ("How old is the sourdough starter?", "eleven years old"),
    ("How early do I need to order a cake for a birthday?", "three days ahead"),
    ("Which day of the week can I get rye bread?", "only sold on Fridays"),
    ("How much is a return ticket for one day?", "fourteen euros"),
    ("Can I take my bike on the train?", "Bicycles ride in the last carriage"),
    ("Do I get my money back if the train is very late?", "fare is refunded"),
    ("Am I allowed to use a hose in summer?", "Hoses are forbidden"),
    ("Can leftover meat go in the compost?", "No cooked food or meat"),
    ("Who owns the beehives?", "Ana Duarte"),
    ("Where can music bots play?", "Lounge"),
    ("How do I get permission to pin messages?", "Archivist role"),
    ("When is movie night?", "second Thursday"),
    ("How long does the battery last on one charge?", "nine hours"),
    ("Who fixes a broken screen?", "workshop on the third floor"),
    ("How often must I change my password?", "every ninety days"),
]
