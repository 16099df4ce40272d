"""English sentences and spoken background questions for the synthetic speech clips.

Sentences come from our own templates and word lists (or an optional open-vocabulary corpus); a
content hash fixes each sentence and question phrasing to train or eval, so eval text is never trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from train.dsp import stable_hash
from train.sounds import COUNTABLE, TEXTURES


# --------------------------------------------------------------------------- sentences

NAMES = ["Alice", "Ben", "Carla", "David", "Emma", "Frank", "Grace", "Henry", "Isla", "Jack", "Karen", "Leo",
         "Maria", "Noah", "Olivia", "Peter", "Quinn", "Rosa", "Sam", "Tara", "Victor", "Wendy", "Yusuf", "Zoe",
         "Oscar", "Nina", "Lucas", "Mia", "Ethan", "Sofia", "Daniel", "Hannah", "Omar", "Priya", "Tom", "Lily"]
CITIES = ["London", "Paris", "Berlin", "Madrid", "Rome", "Boston", "Chicago", "Toronto", "Sydney", "Dublin",
          "Edinburgh", "Oslo", "Vienna", "Lisbon", "Denver", "Seattle", "Glasgow", "Leeds", "Austin", "Miami",
          "Tokyo", "Cairo", "Nairobi", "Lima", "Prague", "Athens", "Montreal", "Bristol", "Houston", "Atlanta"]
PLACES = ["the park", "the station", "the library", "the market", "the beach", "the office", "the museum",
          "the airport", "the hospital", "the school", "the bakery", "the gym", "the cinema", "the harbour",
          "the post office", "the garden", "the bank", "the hotel", "the stadium", "the zoo", "the church",
          "the supermarket", "the bus stop", "the pharmacy", "the town hall"]
BUILDINGS = ["library", "bank", "pharmacy", "post office", "bus stop", "train station", "hospital", "bakery",
             "petrol station", "supermarket", "hotel", "museum", "cinema", "school", "police station"]
OBJECTS = ["keys", "phone", "wallet", "umbrella", "laptop", "glasses", "notebook", "jacket", "bag", "ticket",
           "passport", "camera", "charger", "scarf", "watch", "book", "hat", "pen", "bicycle", "guitar"]
ROOMS = ["kitchen", "living room", "bedroom", "bathroom", "garage", "hallway", "office", "basement", "attic"]
APPLIANCES = ["lights", "heater", "television", "radio", "oven", "fan", "kettle", "washing machine", "computer"]
FURNITURE = ["table", "shelf", "desk", "chair", "sofa", "counter", "bed", "windowsill"]
FOODS = ["apples", "bananas", "oranges", "potatoes", "tomatoes", "eggs", "carrots", "onions", "lemons",
         "sandwiches", "cookies", "muffins", "peppers", "pears", "grapes"]
DRINKS = ["tea", "coffee", "orange juice", "water", "hot chocolate", "milk", "lemonade"]
ANIMALS = ["dogs", "cats", "horses", "ducks", "sheep", "rabbits", "cows", "goats", "birds", "foxes"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "silver", "orange", "purple", "grey"]
VEHICLES = ["car", "bus", "van", "truck", "taxi", "bike", "motorcycle", "tram"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WEATHER = ["sunny", "cloudy", "windy", "cold", "warm", "foggy", "rainy", "hot", "freezing"]
SPORTS = ["football", "tennis", "basketball", "chess", "cricket", "volleyball", "golf", "hockey"]
LANGUAGES = ["French", "Spanish", "German", "Japanese", "Italian", "Arabic", "Chinese", "Portuguese"]
ADJECTIVES = ["heavy", "expensive", "small", "old", "loud", "bright", "cheap", "large", "slow", "noisy"]
EVENTS = ["concert", "meeting", "film", "match", "lecture", "party", "class", "show", "interview", "dinner"]
GENRES = ["jazz", "classical", "rock", "pop", "folk", "country", "piano", "relaxing"]
RELATIVES = ["sister", "brother", "aunt", "uncle", "cousin", "grandmother", "grandfather", "friend", "neighbour"]
TASK_NOUNS = ["report", "homework", "painting", "presentation", "puzzle", "letter", "project", "essay"]
PARTS_OF_DAY = ["morning", "afternoon", "evening"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
            "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "twentieth", "twenty first",
            "twenty second", "twenty third", "thirtieth"]

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """0..999 as English words: transcripts match exactly what espeak-ng says."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))


def time_words(rng: np.random.Generator) -> str:
    h = int(rng.integers(1, 13))
    style = int(rng.integers(5))
    if style == 0:
        return f"{number_words(h)} o'clock"
    if style == 1:
        return f"half past {number_words(h)}"
    if style == 2:
        return f"a quarter to {number_words(h)}"
    if style == 3:
        return f"a quarter past {number_words(h)}"
    return f"{number_words(h)} {number_words(int(rng.choice([10, 15, 20, 30, 40, 45, 50])))}"


TEMPLATES = [
    # statements
    "{name} is going to {place} on {day}.",
    "The {event} starts at {time}.",
    "I bought {num} {food} at the market.",
    "My {relative} has lived in {city} for {small} years.",
    "The {color} {vehicle} is parked outside the {building}.",
    "We will arrive in {city} at {time}.",
    "{name} said the {object} was too {adjective}.",
    "There are {num} {animal} in {place}.",
    "It was {weather} in {city} on {day} {part}.",
    "The train to {city} leaves from platform {small} at {time}.",
    "{name} and {name2} played {sport} after school.",
    "{name} left the {color} {object} in the {room} on {day}.",
    "The {object} costs {num} dollars.",
    "Our flight to {city} was delayed by {num} minutes.",
    "{name} has been learning {language} for {small} years.",
    "{name} usually drinks {drink} on {day} {part}s.",
    "{name} was born on the {ordinal} of {month}.",
    "The {building} on Main Street closes at {time}.",
    "Yesterday it was {weather} in {city}, so {name} stayed home.",
    "{name} finished the {task} on {day} {part}.",
    "My {relative} bought a {color} {vehicle} last {month}.",
    "We need {small} more chairs for the {event} on {day}.",
    # questions
    "Where is the nearest {building} in {city}?",
    "What time does {name}'s {event} start on {day}?",
    "How many {food} do we need for the {event} on {day}?",
    "Have you seen my {color} {object} anywhere, {name}?",
    "Is it going to be {weather} in {city} tomorrow?",
    "Did {name} finish the {task} for {name2} yet?",
    "Why is {place} in {city} closed on {day}?",
    "Which {vehicle} goes from {place} to {city}?",
    "{name}, would you like some {drink} this {part}?",
    "Can {name} meet me at {place} at {time}?",
    "How long does it take to drive from {city} to {city2}?",
    "When is your {relative} coming back from {city}?",
    "Who left the {color} {object} on the {furniture}?",
    "Do you know where {name} put the {object}?",
    # commands
    "Please turn off the {appliance} in the {room} at {time}.",
    "Set an alarm for {time} on {day}.",
    "Call {name} and tell them I will be {small} minutes late.",
    "Put the {object} on the {furniture} in the {room}.",
    "Remind me to buy {food} and {drink} on {day} at {time}.",
    "Play some {genre} music in the {room} until {time}.",
    "Send a message to {name} saying I am at {place}.",
    "Add {num} {food} to the shopping list.",
    "Book a table for {small} at {time} on {day}.",
    "Take the {ordinal} street on the left after {place}.",
    "{name}, turn on the {appliance} and close the {room} door.",
    "Meet me at {place} at {time}.",
]


def _one_sentence(rng: np.random.Generator) -> str:
    """One English sentence from our own templates and word lists (millions of combinations)."""
    name, name2 = rng.choice(NAMES, 2, replace=False)
    city, city2 = rng.choice(CITIES, 2, replace=False)
    slots = {
        "name": name, "name2": name2, "city": city, "city2": city2, "place": rng.choice(PLACES),
        "building": rng.choice(BUILDINGS), "object": rng.choice(OBJECTS), "room": rng.choice(ROOMS),
        "appliance": rng.choice(APPLIANCES), "furniture": rng.choice(FURNITURE), "food": rng.choice(FOODS),
        "drink": rng.choice(DRINKS), "animal": rng.choice(ANIMALS), "color": rng.choice(COLORS),
        "vehicle": rng.choice(VEHICLES), "day": rng.choice(DAYS), "month": rng.choice(MONTHS),
        "weather": rng.choice(WEATHER), "sport": rng.choice(SPORTS), "language": rng.choice(LANGUAGES),
        "adjective": rng.choice(ADJECTIVES), "event": rng.choice(EVENTS), "genre": rng.choice(GENRES),
        "relative": rng.choice(RELATIVES), "task": rng.choice(TASK_NOUNS), "part": rng.choice(PARTS_OF_DAY),
        "ordinal": rng.choice(ORDINALS), "time": time_words(rng), "num": number_words(int(rng.integers(2, 100))),
        "small": number_words(int(rng.integers(2, 13))),
    }
    text = str(rng.choice(TEMPLATES)).format(**{k: str(v) for k, v in slots.items()})
    return text[0].upper() + text[1:]


def sentence(rng: np.random.Generator) -> str:
    """One or (25%) two sentences: longer utterances give 4-7 s clips too."""
    text = _one_sentence(rng)
    if rng.random() < 0.25:
        text += " " + _one_sentence(rng)
    return text


def sentence_split(text: str) -> str:
    """Fixed 90/10 split by content hash: a sentence is always train or always eval."""
    return "eval" if stable_hash(text) % 10 == 0 else "train"


def load_sentences(path: str | Path) -> dict[str, list[str]]:
    """A corpus written by ``python -m train.sentences``, split into train / eval by ``sentence_split``."""
    corpus = json.loads(Path(path).read_text())["sentences"]
    return {split: [s for s in corpus if sentence_split(s) == split] for split in ("train", "eval")}


def sentence_for(split: str, rng: np.random.Generator, corpus: dict[str, list[str]] | None = None,
                 share: float = 0.0) -> str:
    """A sentence belonging to ``split`` (rejection sampling on the hash split). With a ``corpus``
    (``load_sentences``), a ``share`` of them come from its open-vocabulary sentences."""
    if corpus and corpus.get(split) and rng.random() < share:
        return str(rng.choice(corpus[split]))
    while True:
        text = sentence(rng)
        if sentence_split(text) == split:
            return text


# --------------------------------------------------------------------------- spoken questions about the background

# (category, target) -> phrasings. target narrows a yes/no question to one sound.
QUESTIONS = {
    ("identify", None): ["What is making that sound behind me?", "What is that noise in the background?",
                         "Can you tell what sound is playing behind me?", "What do you hear in the background?",
                         "What is that sound I can hear right now?"],
    ("count", "beeps"): ["How many beeps did you hear?", "How many times did it beep?",
                         "Can you count the beeps for me?", "How many beeps were there in total?"],
    ("count", "knock"): ["How many times did someone knock?", "How many knocks did you hear?",
                         "Can you count the knocks for me?", "How many knocks were there?"],
    ("count", "clap"): ["How many times did they clap?", "How many claps did you hear?",
                        "Can you count the claps for me?", "How many claps were there?"],
    ("count", "dog_bark"): ["How many times did the dog bark?", "How many barks did you hear?",
                            "Can you count how often the dog barked?", "How many barks were there?"],
    ("pitch", "beeps"): ["Are those beeps high or low?", "Is the beeping high pitched or low pitched?",
                         "Would you say the beeps are high or low in pitch?"],
    ("direction", "sweep"): ["Is that tone going up or down?", "Is the pitch of that sound rising or falling?",
                             "Does that siren sound go up or down in pitch?"],
    ("location", None): ["Where do you think I am right now?", "Can you guess where I am from the sound around me?",
                         "Based on the background, where am I?"],
    ("yes_no", "rain"): ["Is it raining where I am?", "Do you think it is raining here?",
                         "Should I take an umbrella, judging by the sound?"],
    ("yes_no", "wind"): ["Is it windy where I am?", "Do you think the wind is blowing here?",
                         "Is there a strong wind around me?"],
    ("yes_no", "waves"): ["Am I near the sea?", "Do you think I am close to the ocean?",
                          "Can you hear waves behind me?"],
    ("yes_no", "crowd"): ["Are there a lot of people around me?", "Am I in a crowded place?",
                          "Do you think I am surrounded by people?"],
    ("yes_no", "engine"): ["Is there an engine running nearby?", "Can you hear a motor running?",
                           "Is a machine running near me?"],
    ("animals", None): ["Are there any animals nearby?", "Can you hear any animals around me?",
                        "Is there an animal close to me?"],
    ("alarm", None): ["Should I be worried about that sound?", "Is that an alarm going off?",
                      "Is there an alarm ringing somewhere?"],
    ("mood", "music"): ["Is the music behind me happy or sad?", "Does this song sound cheerful or gloomy?",
                        "What is the mood of the music I am listening to?"],
    ("instrument", "music"): ["What instrument is playing in the background?", "What instrument do you hear?",
                              "Which instrument is playing this tune?"],
    ("tempo", "music"): ["Is this song fast or slow?", "Is the music in the background fast or slow?",
                         "How fast is the music playing behind me?"],
    ("drums", "music"): ["Are there drums in this music?", "Can you hear any drums in the song?",
                         "Does this tune have a drum beat?"],
    ("dance", "music"): ["Could I dance to this music?", "Is this music good for dancing?",
                         "Would this song work at a dance party?"],
}


def question_phrasings(category: str, target: str | None, split: str) -> list[str]:
    """Phrasings for ``split``: the one with the smallest hash is held out for eval."""
    items = sorted(QUESTIONS[(category, target)], key=stable_hash)
    return items[:1] if split == "eval" else items[1:]


def question_categories(bg: dict) -> list[tuple[str, str | None]]:
    """Question (category, target) pairs that make sense for background labels ``bg``.

    Repeated entries are more likely to be picked; used so yes/no questions are
    not almost always answered "no".
    """
    kind = bg["kind"]
    if kind == "music":
        return [("identify", None)] + [(c, "music") for c in ("mood", "instrument", "tempo", "drums", "dance")]
    cats = [("identify", None), ("animals", None), ("alarm", None), ("yes_no", None)]
    if kind in ("dog_bark", "bird"):
        cats.append(("animals", None))
    if kind == "alarm":
        cats.append(("alarm", None))
    if kind in COUNTABLE:
        cats += [("count", kind)] * 3
    if kind == "beeps":
        cats += [("pitch", "beeps")] * 2
    if kind == "sweep":
        cats += [("direction", "sweep")] * 3
    if kind in TEXTURES:
        cats += [("location", None), ("yes_no", None)]
    return cats


def spoken_question(bg: dict, split: str, rng: np.random.Generator) -> dict:
    """Pick a question about background ``bg``: returns {category, target, text}."""
    cats = question_categories(bg)
    category, target = cats[int(rng.integers(len(cats)))]
    if category == "yes_no":  # ask about the true texture ~60% of the time when there is one
        others = [t for t in TEXTURES if t != bg["kind"]]
        target = bg["kind"] if bg["kind"] in TEXTURES and rng.random() < 0.6 else str(rng.choice(others))
    text = str(rng.choice(question_phrasings(category, target, split)))
    return {"category": category, "target": target, "text": text}
