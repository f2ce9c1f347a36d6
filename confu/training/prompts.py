"""Offline prompt source for training data and smoke benchmarks.

Training EAGLE-3 / ConFu heads needs user requests that cover the same kinds of task Spec-Bench measures, but
we must never train on the benchmark's own questions. Everything here is built from slot lists written for
this project, plus real passages already on the machine (standard-library docstrings, man pages:
`confu.training.passages`) for the tasks that need a text to work on (summarization, extraction,
retrieval-style QA). Prompts the target writes itself come from `confu.training.self_written`.

Records look like Spec-Bench / MT-bench questions: ``{"id", "category", "turns": [str, ...]}``; about a
third carry a follow-up second turn so the multi-turn path of regeneration and tokenization gets exercised.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from confu.errors import InputError
from confu.training.passages import Passage, man_passages, stdlib_passages

CATEGORIES: tuple[str, ...] = (
    "writing", "roleplay", "coding", "extraction", "stem", "humanities",
    "summarization", "translation", "qa", "math_reasoning", "rag",
)
# Probability that a record gets a follow-up turn (MT-bench style).
FOLLOW_UP_RATE = 0.35


# ----------------------------------------------------------------------------------------------- slot lists

_TOPICS = [
    "urban beekeeping", "a lighthouse that stopped working", "learning to cook at forty", "tidal energy",
    "a small-town library", "the first day at a new job", "night trains across Europe", "composting at home",
    "a lost umbrella", "remote work and loneliness", "a friendship between two chess rivals", "desert hiking",
    "the history of the bicycle", "a robot that learns to garden", "volunteering at an animal shelter",
    "saving money on groceries", "a storm over a fishing village", "moving to a country whose language you "
    "do not speak", "the smell of old books", "a marathon run in the rain", "an inventor's failed prototype",
    "street food markets", "raising a puppy", "a city without cars", "an unexpected letter from a stranger",
    "the value of boredom", "mountain rescue teams", "public transport in winter", "a family recipe",
    "digital privacy for teenagers", "coral reef restoration", "a musician who lost their hearing",
]
_FORMS = [
    "short story", "persuasive essay", "blog post", "poem", "product description", "speech", "diary entry",
    "letter to the editor", "limerick", "newsletter introduction", "haiku sequence", "movie pitch",
]
_AUDIENCES = ["children", "busy professionals", "retirees", "high-school students", "a local newspaper",
              "first-time visitors", "a skeptical reader", "an online community"]
_CONSTRAINTS = ["in under 200 words", "with a surprising ending", "in a formal tone", "in a humorous tone",
                "using vivid sensory details", "in exactly three paragraphs", "in the second person",
                "without using the letter 'z'"]
_PERSONAS = [
    "a medieval blacksmith", "a retired astronaut", "a detective in 1920s Chicago", "a kindergarten teacher",
    "a sommelier", "a lighthouse keeper", "a pirate captain who is afraid of water", "a tired barista",
    "a museum tour guide", "a park ranger", "a Victorian-era inventor", "a personal fitness coach",
    "an alien anthropologist visiting Earth", "a customer-support agent for a time machine company",
    "a grumpy wizard", "a sports commentator", "a ship's cook", "a village herbalist",
]
_SITUATIONS = [
    "A customer asks you to explain your job in plain words.", "Describe your typical morning.",
    "Someone asks for your best piece of advice for a beginner in your trade.",
    "A child asks you what scares you the most.", "You must convince a skeptic to trust you.",
    "Introduce yourself at a party where you know nobody.", "Complain politely about the weather.",
    "Give a short motivational speech to your team before a hard day.",
]
_LANGUAGES = ["Python", "JavaScript", "TypeScript", "C", "C++", "Rust", "Go", "Java", "Kotlin", "Ruby"]
_CODE_TASKS = [
    "reverses the order of words in a sentence", "checks whether a string is a palindrome ignoring "
    "punctuation and case", "merges two sorted lists into one sorted list", "returns the n-th Fibonacci "
    "number iteratively", "finds the longest common prefix of a list of strings", "implements binary search "
    "on a sorted array", "counts how often each word occurs in a text", "removes duplicate items while "
    "keeping their first order", "converts a Roman numeral to an integer", "validates a simple email "
    "address", "rotates a square matrix by 90 degrees", "flattens an arbitrarily nested list",
    "computes the greatest common divisor of two integers", "groups anagrams from a list of words",
    "parses a line of comma-separated values with quoted fields", "returns the k most frequent elements",
    "checks whether parentheses, brackets and braces are balanced", "computes a moving average over a "
    "window", "converts a number of seconds into hours, minutes and seconds", "detects a cycle in a "
    "linked list",
]
_CODE_SNIPPETS = [
    "def average(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total / len(xs) - 1",
    "def last_n(items, n):\n    return items[len(items) - n - 1:]",
    "def count_vowels(s):\n    return sum(1 for c in s if c in 'aeiou')",
    "def is_sorted(xs):\n    return all(xs[i] <= xs[i + 1] for i in range(len(xs)))",
    "def add_item(item, bucket=[]):\n    bucket.append(item)\n    return bucket",
    "def factorial(n):\n    if n == 0:\n        return 0\n    return n * factorial(n - 1)",
]
_ALGORITHMS = ["quicksort", "Dijkstra's shortest-path algorithm", "a hash table lookup", "breadth-first "
               "search", "merge sort", "a binary heap insertion", "the union-find structure", "dynamic "
               "programming for the knapsack problem"]
_STEM_CONCEPTS = [
    "photosynthesis", "entropy", "the Doppler effect", "how vaccines train the immune system", "plate "
    "tectonics", "Ohm's law", "the greenhouse effect", "natural selection", "how a transistor works",
    "the difference between speed and velocity", "public-key cryptography", "osmosis", "how GPS finds "
    "your position", "half-life in radioactive decay", "the water cycle", "how a neural network learns",
    "buoyancy", "catalysts in chemical reactions", "black holes", "how batteries store energy",
    "compound interest", "the placebo effect", "superconductivity", "how lenses focus light",
]
_EXPLAIN_TO = ["a ten-year-old", "a first-year university student", "someone who hated science at "
               "school", "an engineer from another field"]
_HUMANITIES = [
    "the causes of the French Revolution", "the influence of the printing press on European society",
    "why the Silk Road mattered for cultural exchange", "the main ideas of Stoic philosophy",
    "how the Industrial Revolution changed family life", "the role of myth in ancient Greek society",
    "the legacy of the Roman legal system", "why the Renaissance began in Italy", "utilitarianism and its "
    "critics", "the history of public libraries", "the impact of the telegraph on journalism",
    "the meaning of tragedy in Shakespeare's plays", "how cities shaped the modern novel",
    "the ethics of keeping promises", "the cultural significance of tea in East Asia",
    "the rise and fall of the Hanseatic League", "the idea of the social contract", "Impressionism in "
    "painting", "the abolition of slavery in the nineteenth century", "how economists define inflation",
]
_HUMANITIES_TEMPLATES = [
    "Give an overview of {t}.", "What are the strongest arguments for and against common views on {t}?",
    "Write a short lecture outline on {t} for an evening class.", "Explain {t} and why it still matters "
    "today.", "Which misconceptions do people often have about {t}?",
]
_SENTENCES = [
    "The train to the coast leaves at half past seven, so we should pack tonight.",
    "Could you tell me where the nearest pharmacy is?", "I have been learning to play the violin for two "
    "years, but I still practice every day.", "The museum is closed on Mondays and on public holidays.",
    "Please water the plants while I am away next week.", "Our meeting has been moved to Thursday "
    "afternoon.", "She baked bread for the whole neighborhood after the storm.", "It rained so hard that "
    "the river flooded the old bridge.", "We would like a table for four near the window, please.",
    "This recipe needs two eggs, a cup of flour and a pinch of salt.", "He forgot his keys again and had "
    "to wait outside for an hour.", "The children built a snowman in the park this morning.",
    "Thank you for your help; I could not have finished the project without you.",
    "Every evening the old man feeds the pigeons in the square.", "The software update will restart your "
    "computer automatically.", "I am allergic to peanuts; does this dish contain any?",
]
_TARGET_LANGS = ["French", "German", "Spanish", "Italian", "Portuguese", "Dutch", "Swedish", "Polish",
                 "Turkish", "Japanese", "Chinese", "Korean", "Russian", "Hindi", "Indonesian"]
_QA = [
    "How does a refrigerator keep food cold?", "Why is the sky blue during the day and red at sunset?",
    "What is the difference between weather and climate?", "How do noise-cancelling headphones work?",
    "Why do onions make people cry?", "How can I improve my sleep without medication?", "What should I "
    "consider before adopting a cat?", "How do credit scores work?", "Why do we have leap years?",
    "What is a good way to start learning a musical instrument as an adult?", "How do airplanes stay in "
    "the air?", "What are the pros and cons of renting versus buying a home?", "Why does bread go stale?",
    "How can I prepare for a job interview?", "What makes a password strong?", "How does a microwave "
    "oven heat food?", "Why do cats purr?", "How can a small team run effective meetings?",
    "What is the best way to remember names?", "Why does ice float on water?", "How are rainbows formed?",
    "What should be in a basic first-aid kit?",
]
_NAMES = ["Ana", "Bilal", "Chen", "Dmitri", "Emma", "Farah", "Gustavo", "Hana", "Ivan", "Julia", "Kofi",
          "Lena", "Mateo", "Noor", "Oskar", "Priya"]
_ITEMS = ["notebooks", "apples", "concert tickets", "bags of rice", "bicycle tires", "plant pots"]
_VENDORS = ["Greenleaf Market", "Harbor Hardware", "Bluebird Books", "Summit Outdoor Supply", "Corner Cafe"]
_GENERIC_FOLLOW_UPS = [
    "Now summarize your answer in three bullet points.", "Rewrite your answer for a ten-year-old.",
    "What is the weakest part of your answer, and how would you improve it?",
    "Make your answer half as long without losing the key points.",
]
_FOLLOW_UPS: dict[str, list[str]] = {
    "writing": ["Rewrite it so that it ends on a hopeful note.", "Turn it into a bulleted outline.",
                "Now write a catchy title and a one-line teaser for it."],
    "roleplay": ["Stay in character: what is the hardest part of your work?",
                 "Still in character, tell me about a mistake you once made."],
    "coding": ["Now add a few unit tests for it.", "Rewrite it so it handles empty input gracefully.",
               "What is the time and memory complexity of your solution?"],
    "extraction": ["Now return the same information as a markdown table.",
                   "Which of the extracted items is the most important, and why?"],
    "stem": ["Give a real-world example of it.", "Write a quiz question about it, with the answer."],
    "humanities": ["Which primary sources would you read to learn more?",
                   "How would a critic respond to your answer?"],
    "summarization": ["Now summarize it in one sentence of at most 20 words.",
                      "List three questions a reader might still have after reading it."],
    "translation": ["Translate your translation back into English as literally as possible.",
                    "Explain any word choices that were hard to translate."],
    "qa": _GENERIC_FOLLOW_UPS,
    "math_reasoning": ["Check your answer by solving the problem a different way.",
                       "What would the answer be if every number in the problem were doubled?"],
    "rag": ["Quote the sentence from the passage that best supports your answer.",
            "What related question does the passage leave unanswered?"],
}


def _passage_pool(n: int, rng: random.Random, use_man_pages: bool) -> list[Passage]:
    pool = list(stdlib_passages())
    if use_man_pages:
        pool.extend(man_passages(max(8, n // 4), rng))
    rng.shuffle(pool)
    return pool


# ------------------------------------------------------------------------------------------------ builders

_Builder = Callable[[random.Random, "_Ctx"], list[str]]


@dataclass
class _Ctx:
    passages: list[Passage]
    cursor: int = 0

    def next_passage(self) -> Passage:
        # Round-robin so passages repeat only after the whole pool has been used once.
        passage = self.passages[self.cursor % len(self.passages)]
        self.cursor += 1
        return passage


def _label(p: Passage) -> str:
    return f"the Python documentation of `{p.title}`" if p.source == "python" else f"the {p.title} manual"


def _writing(rng: random.Random, ctx: _Ctx) -> list[str]:
    form, topic = rng.choice(_FORMS), rng.choice(_TOPICS)
    return [rng.choice([
        f"Write a {form} about {topic} {rng.choice(_CONSTRAINTS)}.",
        f"Write a {form} about {topic} for {rng.choice(_AUDIENCES)}.",
        f"Draft a {form} that uses {topic} as a metaphor for change.",
    ])]


def _roleplay(rng: random.Random, ctx: _Ctx) -> list[str]:
    persona, situation = rng.choice(_PERSONAS), rng.choice(_SITUATIONS)
    return [rng.choice([f"Pretend you are {persona}. {situation} Respond in character.",
                        f"You are {persona}. {situation} Keep it under 150 words and stay in character."])]


def _coding(rng: random.Random, ctx: _Ctx) -> list[str]:
    lang = rng.choice(_LANGUAGES)
    kind = rng.random()
    if kind < 0.6:
        return [f"Write a {lang} function that {rng.choice(_CODE_TASKS)}. Include a short usage example."]
    if kind < 0.85:
        snippet = rng.choice(_CODE_SNIPPETS)
        return [f"Explain what this Python code does and point out any bug:\n\n```python\n{snippet}\n```"]
    return [f"Explain the time complexity of {rng.choice(_ALGORITHMS)} and show a simple {lang} sketch."]


def _receipt(rng: random.Random) -> str:
    qty, price = rng.randint(2, 12), rng.randint(150, 4999) / 100
    day, month = rng.randint(1, 28), rng.choice(["March", "June", "October", "December"])
    return (f"Receipt from {rng.choice(_VENDORS)}, {month} {day}. Customer: {rng.choice(_NAMES)}. "
            f"{qty} x {rng.choice(_ITEMS)} at ${price:.2f} each. Delivery fee ${rng.randint(0, 9)}.00. "
            f"Paid by card ending in {rng.randint(1000, 9999)}.")


def _extraction(rng: random.Random, ctx: _Ctx) -> list[str]:
    fmt = rng.choice(["a JSON list", "a markdown table", "a bulleted list"])
    if rng.random() < 0.3:
        return [f"Extract the vendor, customer, date, items, quantity and total cost from this receipt. "
                f"Return {fmt}.\n\n{_receipt(rng)}"]
    p = ctx.next_passage()
    what = rng.choice(["every function, class, option or command name it mentions",
                       "every parameter or option together with a one-line description",
                       "all default values and limits it states", "the key facts as short statements"])
    return [f"From the text below ({_label(p)}), extract {what}. Return {fmt}.\n\n{p.text}"]


def _stem(rng: random.Random, ctx: _Ctx) -> list[str]:
    concept = rng.choice(_STEM_CONCEPTS)
    return [rng.choice([f"Explain {concept} to {rng.choice(_EXPLAIN_TO)}.",
                        f"What is {concept}? Give the key idea, any formula or mechanism, and an example.",
                        f"Describe a simple experiment or demonstration that illustrates {concept}."])]


def _humanities(rng: random.Random, ctx: _Ctx) -> list[str]:
    return [rng.choice(_HUMANITIES_TEMPLATES).format(t=rng.choice(_HUMANITIES))]


def _summarization(rng: random.Random, ctx: _Ctx) -> list[str]:
    p = ctx.next_passage()
    how = rng.choice(["in three sentences", "in one paragraph for a beginner",
                      "as a TL;DR of at most 30 words", "as five bullet points"])
    return [f"Summarize the following text ({_label(p)}) {how}.\n\n{p.text}"]


def _translation(rng: random.Random, ctx: _Ctx) -> list[str]:
    sentence, lang = rng.choice(_SENTENCES), rng.choice(_TARGET_LANGS)
    return [rng.choice([f'Translate into {lang}: "{sentence}"',
                        f'How would a native speaker say this in {lang}? "{sentence}" Give one formal and '
                        f"one casual version."])]


def _qa(rng: random.Random, ctx: _Ctx) -> list[str]:
    return [rng.choice(_QA)]


def _math(rng: random.Random, ctx: _Ctx) -> list[str]:
    a, b, c = rng.randint(3, 40), rng.randint(2, 25), rng.randint(50, 500)
    name, other = rng.sample(_NAMES, 2)
    problems = [
        f"{name} buys {a} {rng.choice(_ITEMS)} at ${b} each and pays with ${c + a * b}. How much change "
        f"does {name} get?",
        f"A train travels {c} km at an average speed of {b * 5} km/h. How long does the trip take in hours "
        f"and minutes?",
        f"{name} is {a} years old and {other} is {a + b} years old. In how many years will the sum of "
        f"their ages be {2 * a + b + 2 * (c // 10)}?",
        f"Solve for x: {a}x + {b} = {a * rng.randint(2, 9) + b}.",
        f"A shop raises a ${c} price by {b}% and then gives a {a % 30 + 5}% discount. What is the final "
        f"price, and is it higher or lower than ${c}?",
        f"{name} can paint a fence in {a % 9 + 2} hours and {other} can paint it in {b % 7 + 3} hours. "
        f"How long do they need working together?",
        f"A rectangle has a perimeter of {2 * (a + b)} cm and one side of {a} cm. What is its area?",
        f"A bag holds {a} red and {b} blue marbles. Two are drawn without replacement. What is the "
        f"probability that both are red?",
    ]
    return [rng.choice(problems) + " Show your reasoning step by step."]


def _rag(rng: random.Random, ctx: _Ctx) -> list[str]:
    p = ctx.next_passage()
    subject = f"`{p.title}`" if p.source == "python" else p.title.split("(")[0]
    question = rng.choice([f"What is the main purpose of {subject}?",
                           f"Which arguments or options of {subject} does the passage describe?",
                           f"What does {subject} return or produce, according to the passage?",
                           f"Does the passage mention any error conditions or caveats for {subject}?"])
    return [f"Answer the question using only the passage below. If the passage does not contain the answer, "
            f"say so.\n\nPassage ({_label(p)}):\n{p.text}\n\nQuestion: {question}"]


_BUILDERS: dict[str, _Builder] = {
    "writing": _writing, "roleplay": _roleplay, "coding": _coding, "extraction": _extraction,
    "stem": _stem, "humanities": _humanities, "summarization": _summarization, "translation": _translation,
    "qa": _qa, "math_reasoning": _math, "rag": _rag,
}


def _follow_up(rng: random.Random, category: str, first: str) -> str:
    if category == "translation":
        langs = [lang for lang in _TARGET_LANGS if lang not in first]
        if rng.random() < 0.5:
            return f"Now translate the same sentence into {rng.choice(langs)}."
    return rng.choice(_FOLLOW_UPS[category])


def offline_prompts(n: int, seed: int = 0, use_man_pages: bool = True) -> list[dict[str, Any]]:
    """Up to ``n`` prompt records ``{"id", "category", "turns"}`` with distinct first turns, balanced across
    :data:`CATEGORIES` while their slot spaces last.

    Deterministic for a seed on a given machine (the passage pool depends on the Python version and the
    installed man pages). A category whose builder keeps repeating itself is skipped for that record and the
    others fill in: a repeated prompt would only be answered twice, identically under greedy decoding.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    ctx = _Ctx(passages=_passage_pool(n, rng, use_man_pages))
    order = list(CATEGORIES)
    rng.shuffle(order)  # which categories get the extra record when n is not a multiple of 11
    seen: set[str] = set()
    records: list[dict[str, Any]] = []
    for attempt in range(10 * n):
        if len(records) == n:
            break
        category = order[attempt % len(order)]
        turns = next((t for t in (_BUILDERS[category](rng, ctx) for _ in range(20)) if t[0] not in seen), None)
        if turns is None:
            continue
        seen.add(turns[0])
        if rng.random() < FOLLOW_UP_RATE:
            turns = [turns[0], _follow_up(rng, category, turns[0])]
        records.append({"id": f"offline-{seed}-{len(records):06d}", "category": category, "turns": turns})
    return records


# --------------------------------------------------------------------------------- vocabulary-seeded prompts
# The slot lists above cover a few dozen topics, so the replies to them use few distinct words: 2,380
# conversations of them hold only 11.3k distinct reply tokens, and 5.7% of the tokens the target writes for
# our own evaluation prompts never occur in any reply. Seeding prompts with words drawn from the target's own
# vocabulary spreads the replies over everything the target can talk about, without any outside data.

_WORD_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("qa", 'What does the word "{w}" mean? Give two example sentences that use it.'),
    ("qa", 'Give me five words related to "{w}" and say how each one is connected to it.'),
    ("stem", "Tell me about {w}."),
    ("stem", 'Explain "{w}" to a curious teenager.'),
    ("humanities", 'Where does the word "{w}" come from, and how is it used today?'),
    ("writing", 'Write a short story that uses the words "{w}", "{v}" and "{u}".'),
    ("writing", "Write a short poem about {w}."),
    ("writing", 'Write a paragraph for a travel blog that mentions "{w}" and "{v}".'),
    ("roleplay", 'Pretend you are {p}. Tell me what "{w}" makes you think of. Respond in character.'),
    ("translation", 'Translate the word "{w}" into {lang}, and use it in one sentence in both languages.'),
    ("coding", 'Write a {code} function that counts how often the word "{w}" appears in a text, with an '
               "example."),
)


def vocabulary_words(tokenizer: Any, min_letters: int = 4) -> list[str]:
    """Whole words of the target's vocabulary: tokens that start a word and are ``min_letters`` or more
    ASCII letters, as the tokenizer decodes them, in id order (so a seed picks the same words every time).
    A capitalized word whose lowercase form is also a token is left out: "Tell me about Maps." reads badly."""
    words: dict[str, None] = {}
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        word = text.strip()
        if text[:1] == " " and len(word) >= min_letters and word.isascii() and word.isalpha():
            words[word] = None
    return [w for w in words if w == w.lower() or w.lower() not in words]


def word_prompts(words: Sequence[str], n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` prompt records (ids ``words-<seed>-<i>``) built from :data:`_WORD_TEMPLATES`, each seeded with
    words drawn uniformly from ``words``; about a third get a generic follow-up turn."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if len(words) < 3:
        raise InputError(f"word prompts need at least 3 words, got {len(words)}")
    rng, pool = random.Random(seed), list(words)
    records: list[dict[str, Any]] = []
    for i in range(n):
        category, template = _WORD_TEMPLATES[i % len(_WORD_TEMPLATES)]
        w, v, u = rng.sample(pool, 3)
        turns = [template.format(w=w, v=v, u=u, p=rng.choice(_PERSONAS), lang=rng.choice(_TARGET_LANGS),
                                 code=rng.choice(_LANGUAGES))]
        if rng.random() < FOLLOW_UP_RATE:
            turns.append(rng.choice(_GENERIC_FOLLOW_UPS))
        records.append({"id": f"words-{seed}-{i:06d}", "category": category, "turns": turns})
    return records
