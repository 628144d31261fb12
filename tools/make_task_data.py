"""Writes the data of the two task recipes on the embedded teacher, composed from the hand-written
lists below with a fixed seed (nothing is downloaded; the same files come out every time):

- recipes/data/past-tense.jsonl (generation, recipes/past-tense.yaml): a present-tense sentence
  (`text`) and the same sentence in the past tense (`answer`);
- recipes/data/contacts.jsonl (extraction, recipes/contacts.yaml): a short message from a person
  (`message`) and the gold JSON object of their name, city and email address (`answer`).

    .venv/bin/python tools/make_task_data.py                 # rewrites recipes/data/{past-tense,contacts}.jsonl
    .venv/bin/python tools/make_task_data.py --out /tmp/data # elsewhere, e.g. to compare with the committed files

The teacher's agreement with these gold answers is measured by tools/probe_teacher_task.py.
"""

from __future__ import annotations

import argparse
import json
import random
import unicodedata
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = 500  # per task; a held-out fraction of 0.2 keeps 100 apart
PAST_TENSE_SEED = 14_701
CONTACTS_SEED = 14_702

FIRST_NAMES = [
    "Maria", "James", "Aisha", "Kenji", "Sofia", "Lars", "Priya", "Tomás", "Elena", "Omar", "Chloe", "Dmitri",
    "Fatima", "Lucas", "Ingrid", "Mateo", "Yuki", "Noah", "Amara", "Pierre", "Hannah", "Ravi", "Zoe", "Carlos",
    "Leila", "Jonas", "Mei", "Ethan", "Nadia", "Felix", "Grace", "Hugo", "Anika", "Samuel", "Lucía", "Tariq",
    "Olga", "Kwame", "Isabel", "Rafael", "Sara", "Daniel", "Emma", "Mohammed", "Julia", "Arjun", "Clara", "Paolo",
    "Nina", "Victor", "Ayumi", "Brian", "Rosa", "Liam", "Freya", "Diego", "Hana", "Oscar", "Beatriz", "Kofi",
]
LAST_NAMES = [
    "Lopez", "Smith", "Khan", "Tanaka", "Rossi", "Nielsen", "Sharma", "García", "Petrova", "Haddad", "Martin",
    "Ivanov", "Bello", "Silva", "Berg", "Fernández", "Sato", "Brown", "Okafor", "Dubois", "Schmidt", "Patel",
    "Walker", "Romero", "Farah", "Becker", "Chen", "Clarke", "Novak", "Weber", "Müller", "Kowalski", "Jensen",
    "Moreau", "Costa", "Nakamura", "Mensah", "O'Brien", "Lindqvist", "Yilmaz", "Park", "Ahmed", "Russo", "Kim",
    "Wagner", "Hughes", "Mendes", "Ito", "Ortiz", "Larsen",
]
CITIES = [
    "Madrid", "Toronto", "Osaka", "Lisbon", "Berlin", "Chicago", "Nairobi", "Dublin", "Melbourne", "Vienna",
    "Seattle", "Lyon", "Mumbai", "Denver", "Prague", "Boston", "Seville", "Helsinki", "Auckland", "Porto",
    "Hamburg", "Montreal", "Kyoto", "Accra", "Krakow", "Glasgow", "Valencia", "Stockholm", "Bangalore", "Austin",
    "Edinburgh", "Munich", "Vancouver", "Marseille", "Copenhagen", "Budapest", "Lagos", "Istanbul", "Cape Town",
    "Buenos Aires", "San Diego", "Manchester", "Zurich", "Rotterdam", "Athens", "Warsaw", "Bologna", "Cairo",
]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def capitalized(text: str) -> str:
    return text[0].upper() + text[1:]


# --- past tense ----------------------------------------------------------------------------------

# (base form, third person singular, past), and objects that fit; {city} and {person} are filled in
VERBS = [
    ("buy", "buys", "bought", ["a new bike", "fresh bread", "two tickets", "a warm coat", "flowers for {person}"]),
    ("write", "writes", "wrote", ["a letter", "the weekly report", "a short poem", "an email to {person}"]),
    ("read", "reads", "read", ["the newspaper", "a long novel", "the instructions", "the contract"]),
    ("visit", "visits", "visited", ["the museum", "{city}", "an old friend", "the new library"]),
    ("find", "finds", "found", ["the keys", "a lost wallet", "a cheap flight", "the missing file"]),
    ("sell", "sells", "sold", ["the old car", "handmade soap", "vegetables at the market", "the house"]),
    ("make", "makes", "made", ["pancakes", "a mistake", "a list of questions", "fresh pasta"]),
    ("clean", "cleans", "cleaned", ["the kitchen", "the windows", "the garage", "the office"]),
    ("take", "takes", "took", ["the train to {city}", "a photo of the bridge", "the dog for a walk", "a taxi"]),
    ("meet", "meets", "met", ["{person} at the station", "a client", "the new neighbors", "the team"]),
    ("lose", "loses", "lost", ["the umbrella", "the match", "a glove", "the receipt"]),
    ("paint", "paints", "painted", ["the fence", "a portrait", "the bedroom walls", "a view of {city}"]),
    ("bring", "brings", "brought", ["a cake", "the documents", "snacks for everyone", "a gift for {person}"]),
    ("win", "wins", "won", ["the race", "a prize", "the chess game", "the final"]),
    ("call", "calls", "called", ["the doctor", "{person}", "the hotel in {city}", "a plumber"]),
    ("cook", "cooks", "cooked", ["dinner for six", "a spicy soup", "rice and beans", "breakfast"]),
    ("drive", "drives", "drove", ["to {city}", "the kids to school", "a small van", "home"]),
    ("send", "sends", "sent", ["a package to {city}", "the invoice", "a postcard", "a message to {person}"]),
    ("fix", "fixes", "fixed", ["the broken chair", "the printer", "a leaking tap", "the bug"]),
    ("watch", "watches", "watched", ["a documentary", "the football match", "the birds", "an old film"]),
    ("teach", "teaches", "taught", ["a maths class", "the new staff", "{person} to swim", "guitar lessons"]),
    ("build", "builds", "built", ["a wooden shed", "a sandcastle", "a website", "a bookshelf"]),
    ("plant", "plants", "planted", ["tomatoes", "an apple tree", "tulips in the garden", "herbs"]),
    ("leave", "leaves", "left", ["the party early", "{city}", "a note on the door", "the keys at home"]),
    ("catch", "catches", "caught", ["the last bus", "a cold", "a big fish", "the early flight"]),
    ("sing", "sings", "sang", ["in a choir", "a song for {person}", "at the wedding", "a lullaby"]),
    ("pay", "pays", "paid", ["the rent", "the bill", "for the tickets", "the electrician"]),
    ("open", "opens", "opened", ["a small shop in {city}", "the window", "a bank account", "the box"]),
    ("forget", "forgets", "forgot", ["the password", "the meeting", "{person}'s birthday", "the umbrella"]),
    ("carry", "carries", "carried", ["the heavy boxes", "the shopping", "a backpack", "the baby"]),
    ("choose", "chooses", "chose", ["a blue sofa", "the cheapest room", "a new phone", "the red wine"]),
    ("borrow", "borrows", "borrowed", ["a ladder", "three books", "{person}'s car", "some money"]),
    ("order", "orders", "ordered", ["a pizza", "new shoes", "coffee for the team", "a taxi to the airport"]),
    ("grow", "grows", "grew", ["potatoes", "a beard", "roses", "chili peppers"]),
    ("draw", "draws", "drew", ["a map", "a cat", "the plans for the house", "a comic strip"]),
    ("play", "plays", "played", ["the piano", "tennis with {person}", "cards", "a board game"]),
    ("answer", "answers", "answered", ["the phone", "every question", "the survey", "{person}'s email"]),
    ("break", "breaks", "broke", ["a glass", "the record", "the news to {person}", "a plate"]),
    ("wear", "wears", "wore", ["a green hat", "a suit", "running shoes", "a long scarf"]),
    ("study", "studies", "studied", ["chemistry", "the map of {city}", "for the exam", "French"]),
]
# (intransitive base, third person, past, complements)
INTRANSITIVE = [
    ("arrive", "arrives", "arrived", ["late", "in {city}", "at the airport", "on time"]),
    ("walk", "walks", "walked", ["to work", "along the river", "home", "to the station"]),
    ("run", "runs", "ran", ["in the park", "to the shop", "a marathon in {city}", "every morning"]),
    ("swim", "swims", "swam", ["in the lake", "across the bay", "at the pool"]),
    ("sleep", "sleeps", "slept", ["badly", "on the train", "until noon"]),
    ("travel", "travels", "traveled", ["to {city}", "by train", "with {person}"]),
    ("work", "works", "worked", ["in {city}", "from home", "at a bakery", "late"]),
    ("wait", "waits", "waited", ["for the bus", "for {person}", "outside the bank"]),
    ("laugh", "laughs", "laughed", ["at the joke", "loudly", "with {person}"]),
    ("stay", "stays", "stayed", ["at a hotel in {city}", "at home", "with {person}"]),
]
SINGULAR_SUBJECTS = ["my brother", "my sister", "our teacher", "the new manager", "my neighbor", "her cousin",
                     "the driver", "the chef", "he", "she", "the old man", "the baker", "my grandmother",
                     "the nurse", "our landlord", "his daughter"]
PLURAL_SUBJECTS = ["I", "we", "they", "you", "the children", "my parents", "our neighbors", "the students",
                   "the tourists", "my friends", "the workers"]
# time and place phrases that read right in either tense
PLACES = ["in {city}", "on {weekday}", "after lunch", "in the morning", "before dinner", "in the evening",
          "at the weekend", "after work"]


def _fill(text: str, rng: random.Random) -> str:
    return text.format(city=rng.choice(CITIES), person=rng.choice(FIRST_NAMES), weekday=rng.choice(WEEKDAYS))


def _subject(rng: random.Random) -> tuple[str, bool]:
    """(subject, whether it takes the third person singular)."""
    roll = rng.random()
    if roll < 0.4:
        return rng.choice(FIRST_NAMES), True
    if roll < 0.65:
        return rng.choice(SINGULAR_SUBJECTS), True
    if roll < 0.72:
        first, second = rng.sample(FIRST_NAMES, 2)
        return f"{first} and {second}", False
    return rng.choice(PLURAL_SUBJECTS), False


def _predicate(rng: random.Random, singular: bool) -> tuple[str, str]:
    """(present, past) of one verb phrase."""
    base, third, past, complements = rng.choice(VERBS + INTRANSITIVE)
    complement = _fill(rng.choice(complements), rng)
    return f"{third if singular else base} {complement}", f"{past} {complement}"


def past_tense_example(rng: random.Random) -> dict:
    subject, singular = _subject(rng)
    shape = rng.random()
    if shape < 0.12:  # to be
        where = _fill(rng.choice(["in {city}", "at home", "at the office", "very tired", "late again",
                                  "happy with the result", "on holiday in {city}", "ready to leave"]), rng)
        present = ("am" if subject == "I" else "is" if singular else "are") + f" {where}"
        past = ("was" if subject == "I" or singular else "were") + f" {where}"
    elif shape < 0.25:  # negation
        base, _, _, complements = rng.choice(VERBS + INTRANSITIVE)
        complement = _fill(rng.choice(complements), rng)
        present = f"{'does' if singular else 'do'} not {base} {complement}"
        past = f"did not {base} {complement}"
    elif shape < 0.4:  # two verb phrases
        (present_1, past_1), (present_2, past_2) = _predicate(rng, singular), _predicate(rng, singular)
        present, past = f"{present_1} and {present_2}", f"{past_1} and {past_2}"
    else:
        present, past = _predicate(rng, singular)
    tail = ""
    if rng.random() < 0.35 and not present.endswith(("morning", "night")):
        tail = " " + _fill(rng.choice(PLACES), rng)
    return {"text": capitalized(f"{subject} {present}{tail}."), "answer": capitalized(f"{subject} {past}{tail}.")}


# --- contacts ------------------------------------------------------------------------------------

DOMAINS = ["example.com", "example.org", "example.net", "mail.example", "inbox.example", "post.example"]
# each names the person, their city and their email address once, unambiguously
CONTACT_MESSAGES = [
    "Hi, I'm {name} from {city}. You can reach me at {email}.",
    "Hello, this is {name} ({email}). I live in {city} and have a question about my order.",
    "My name is {name} and I'm based in {city}. Please reply to {email}.",
    "{name} here, writing from {city}. My email is {email}.",
    "Dear support, please update my account: {name}, {city}, {email}.",
    "Good afternoon! I am {name}. I moved to {city} last month; my new email address is {email}.",
    "Hi there, {name} from {city} would like to join the newsletter. Email: {email}",
    "I'd like to book a table for {people} on {weekday}. {name}, {city}, {email}",
    "Please send the invoice to {email}. Thanks, {name} ({city})",
    "Hello! I'm {name}, a teacher in {city}. Could you send the brochure to {email}?",
    "Registration for the {city} workshop: {name}, {email}.",
    "This is {name}. The parcel for {city} has not arrived yet. Contact me at {email}, please.",
    "Hey, it's {name} in {city}. Can you add {email} to the mailing list?",
    "I am applying for the job in {city}. My name is {name} and my email is {email}.",
    "Hi, {name} again. I'm still in {city} until {weekday}; write to {email}.",
    "Contact request from {name} ({email}), who lives in {city}.",
    "Hello, I bought a lamp at your {city} store. {name}, {email}",
    "My details: {name}, living in {city}, email {email}. Please call me back on {weekday}.",
    "Good morning, I'm {name} and I run a small bakery in {city}. My email: {email}",
    "Could someone from the {city} office contact me at {email}? Regards, {name}",
]


def ascii_lower(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return "".join(char for char in folded.lower() if char.isalnum())


def email_of(first: str, last: str, rng: random.Random) -> str:
    f, l = ascii_lower(first), ascii_lower(last)
    user = rng.choice([f"{f}.{l}", f"{f[0]}{l}", f"{f}{rng.randint(1, 99)}", f"{f}_{l}", f"{l}.{f}", f"{f}{l[0]}"])
    return f"{user}@{rng.choice(DOMAINS)}"


def contact_example(rng: random.Random) -> dict:
    first, last, city = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES), rng.choice(CITIES)
    name, email = f"{first} {last}", email_of(first, last, rng)
    message = rng.choice(CONTACT_MESSAGES).format(name=name, city=city, email=email, weekday=rng.choice(WEEKDAYS),
                                                  people=rng.choice(["two", "three", "four", "six"]))
    return {"message": message, "answer": {"name": name, "city": city, "email": email}}


# -------------------------------------------------------------------------------------------------

TASKS: dict[str, tuple[int, Callable[[random.Random], dict], str]] = {
    "past-tense.jsonl": (PAST_TENSE_SEED, past_tense_example, "text"),
    "contacts.jsonl": (CONTACTS_SEED, contact_example, "message"),
}


def examples(seed: int, make: Callable[[random.Random], dict], key: str, count: int = EXAMPLES) -> list[dict]:
    """`count` examples with distinct inputs (`key`), in the order the seeded generator makes them."""
    rng, seen, rows = random.Random(seed), set(), []
    while len(rows) < count:
        row = make(rng)
        if row[key] not in seen:
            seen.add(row[key])
            rows.append(row)
    return rows


def write_all(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, (seed, make, key) in TASKS.items():
        path = out / filename
        with open(path, "w", encoding="utf-8", newline="\n") as handle:
            for row in examples(seed, make, key):
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "recipes" / "data", help="folder for the JSONL files")
    for path in write_all(parser.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
