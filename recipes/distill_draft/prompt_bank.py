"""Programmatic chat prompts for distilling duo's default draft model.

The training prompts are built from hand-written templates crossed with hand-written slot values
(topics, goals, coding tasks, characters, numbers ...), grouped by category: questions, explanations,
definitions, comparisons, lists, advice, stories, poems, code, maths, writing. ``build_prompts`` draws a
fixed number of distinct prompts with a seeded RNG, so the same config always yields the same prompts.

No text here comes from a dataset or a model hub; everything was written for this recipe.
"""

from __future__ import annotations

import random
import re

TOPICS = [
    "photosynthesis", "gravity", "the water cycle", "black holes", "climate change", "the immune system",
    "volcanoes", "earthquakes", "the solar system", "electricity", "magnetism", "DNA", "evolution",
    "the Roman Empire", "the French Revolution", "the Industrial Revolution", "ancient Egypt",
    "the printing press", "democracy", "inflation", "supply and demand", "the stock market",
    "machine learning", "the internet", "blockchain", "cloud computing", "computer viruses",
    "renewable energy", "solar panels", "nuclear power", "recycling", "deforestation", "ocean tides",
    "rainbows", "the human heart", "sleep", "vitamins", "exercise", "meditation", "the moon landing",
    "the Great Wall of China", "the Olympic Games", "jazz music", "impressionist painting", "chess",
    "coffee", "chocolate", "bread baking", "composting", "the theory of relativity", "quantum computing",
    "vaccines", "antibiotics", "the greenhouse effect", "plate tectonics", "hurricanes", "glaciers",
    "the speed of light", "atoms", "chemical reactions", "the periodic table", "cryptography",
    "operating systems", "databases", "smartphones", "social media", "electric cars", "airplanes",
    "rockets", "satellites", "GPS", "3D printing", "robots", "artificial intelligence",
    "the Renaissance", "the Silk Road", "the Cold War", "the Amazon rainforest", "deserts", "coral reefs",
    "dinosaurs", "whales", "photography", "the piano", "public speaking", "time management",
    "budgeting", "compound interest", "taxes", "minimum wage", "urban gardening", "the metric system",
]

COMPARISON_PAIRS = [
    ("a virus", "a bacterium"), ("weather", "climate"), ("Python", "JavaScript"), ("a list", "a tuple"),
    ("RAM", "storage"), ("a comet", "an asteroid"), ("speed", "velocity"), ("mitosis", "meiosis"),
    ("a democracy", "a monarchy"), ("stocks", "bonds"), ("renting", "buying a home"),
    ("cats", "dogs"), ("tea", "coffee"), ("solar power", "wind power"), ("a lake", "a sea"),
    ("fiction", "non-fiction"), ("a CPU", "a GPU"), ("TCP", "UDP"), ("SQL", "NoSQL databases"),
    ("an alligator", "a crocodile"), ("a simile", "a metaphor"), ("weight", "mass"),
    ("a hurricane", "a tornado"), ("baking soda", "baking powder"), ("a credit card", "a debit card"),
    ("a compiler", "an interpreter"), ("a frog", "a toad"), ("a star", "a planet"),
]

GOALS = [
    "improve my sleep", "save money each month", "learn a new language", "stay focused while studying",
    "get better at cooking", "start running", "make new friends in a new city", "prepare for a job interview",
    "reduce stress at work", "keep my houseplants alive", "write a good resume", "learn to play the guitar",
    "organize my closet", "drink more water", "wake up earlier", "read more books", "stop procrastinating",
    "become a better listener", "plan a road trip", "eat healthier on a budget", "learn to code",
    "keep a journal", "speak more confidently", "reduce my screen time", "train my puppy",
    "decorate a small apartment", "prepare for an exam", "start a small business", "learn to swim",
    "take better photos with my phone",
]

ACTIVITIES = [
    "a rainy afternoon", "a birthday party", "a science fair project", "a family dinner",
    "a weekend trip", "a school fundraiser", "a team-building day", "a picnic", "a blog", "a podcast",
    "a board game night", "a garden", "a short film", "a summer holiday",
]

CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "computes the factorial of a number",
    "returns the Fibonacci sequence up to n", "counts the vowels in a sentence", "finds the largest number in a list",
    "removes duplicates from a list", "checks whether a word is a palindrome", "sorts a list of numbers",
    "converts Celsius to Fahrenheit", "reads a text file and counts its lines", "merges two sorted lists",
    "computes the average of a list", "finds the greatest common divisor of two numbers",
    "counts how often each word appears in a text", "flattens a nested list", "checks whether two words are anagrams",
    "generates a random password", "converts a decimal number to binary", "returns the second smallest element of a list",
    "capitalizes the first letter of every word", "sums the digits of an integer", "transposes a matrix",
    "validates an email address", "implements binary search",
]

LANGUAGES = ["Python", "JavaScript", "C", "Java", "Rust", "Go"]

CHARACTERS = [
    "a lonely robot", "a brave little mouse", "a young wizard", "an old fisherman", "a curious girl",
    "a lost puppy", "a talking tree", "a dragon", "a space explorer", "a shy baker", "a clever fox",
    "a retired detective", "a knight", "a lighthouse keeper", "a young inventor", "a friendly ghost",
]

EVENTS = [
    "finds a mysterious map", "learns to fly", "makes an unlikely friend", "gets lost in a forest",
    "discovers a hidden door", "wins a competition", "travels back in time", "saves a village",
    "opens a small shop", "finds a message in a bottle", "meets an alien", "loses something precious",
]

POEM_SUBJECTS = [
    "autumn leaves", "the city at night", "the ocean", "friendship", "a snowy morning", "the stars",
    "a quiet library", "mountains", "the first day of spring", "rain on a window", "a cup of tea", "home",
]

WRITING_TASKS = [
    ("my manager", "taking a day off next Friday"), ("a customer", "a delayed order"),
    ("my neighbor", "a noisy party"), ("a teacher", "missing homework"), ("my team", "a new meeting schedule"),
    ("a landlord", "a broken heater"), ("a friend", "a thank-you for a gift"), ("a colleague", "a project update"),
]

PRODUCTS = [
    "a reusable water bottle", "noise-cancelling headphones", "a standing desk", "a smartwatch",
    "a backpack for hikers", "an electric kettle", "a yoga mat", "a desk lamp",
]

MATH_CONCEPTS = [
    "area of a circle", "perimeter of a rectangle", "volume of a cube", "mean of a set of numbers",
    "slope of a line", "percentage increase", "hypotenuse of a right triangle", "simple interest",
]

SINGLE_TEMPLATES = {
    "question": ["What is {topic}?", "How does {topic} work?", "Why is {topic} important?",
                 "Can you tell me about {topic}?", "What are the most interesting facts about {topic}?"],
    "explanation": ["Explain {topic} in simple terms.", "Explain {topic} to a ten-year-old.",
                    "Give a short explanation of {topic}.", "Describe {topic} in a few paragraphs."],
    "definition": ["Define {topic}.", "What does the term \"{topic}\" mean?", "Give me a definition of {topic}."],
    "list": ["List five facts about {topic}.", "What are the main advantages and disadvantages of {topic}?",
             "Give me a bullet list of key points about {topic}.", "List three common misconceptions about {topic}."],
    "summary": ["Summarize the idea of {topic} in two sentences.", "Write a short paragraph about {topic}."],
}


def _render(rng: random.Random) -> tuple[str, str]:
    """One random (category, prompt) pair."""
    category = rng.choice(
        ["question", "explanation", "definition", "list", "summary", "comparison", "advice", "ideas",
         "story", "poem", "code", "code", "math", "math", "writing", "product"]
    )
    if category in SINGLE_TEMPLATES:
        return category, rng.choice(SINGLE_TEMPLATES[category]).format(topic=rng.choice(TOPICS))
    if category == "comparison":
        a, b = rng.choice(COMPARISON_PAIRS)
        template = rng.choice(["Compare {a} and {b}.", "What is the difference between {a} and {b}?",
                               "How are {a} and {b} similar, and how are they different?"])
        return category, template.format(a=a, b=b)
    if category == "advice":
        template = rng.choice(["How can I {goal}?", "Give me some advice on how to {goal}.",
                               "What are some tips to {goal}?", "I want to {goal}. Where should I start?"])
        return category, template.format(goal=rng.choice(GOALS))
    if category == "ideas":
        return category, f"Give me {rng.choice(['three', 'five', 'seven'])} ideas for {rng.choice(ACTIVITIES)}."
    if category == "story":
        template = rng.choice(["Write a short story about {c} who {e}.", "Tell me a story about {c} who {e}.",
                               "Write the opening of a children's story about {c} who {e}."])
        return category, template.format(c=rng.choice(CHARACTERS), e=rng.choice(EVENTS))
    if category == "poem":
        form = rng.choice(["a poem", "a short poem", "a haiku", "a rhyming poem"])
        return category, f"Write {form} about {rng.choice(POEM_SUBJECTS)}."
    if category == "code":
        task = rng.choice(CODE_TASKS)
        template = rng.choice(["Write a {lang} function that {task}.", "Show me {lang} code that {task}.",
                               "Write a {lang} function that {task}, and explain how it works."])
        return category, template.format(lang=rng.choice(LANGUAGES), task=task)
    if category == "math":
        return category, _math_prompt(rng)
    if category == "writing":
        recipient, subject = rng.choice(WRITING_TASKS)
        return category, f"Write a {rng.choice(['short', 'polite', 'friendly'])} email to {recipient} about {subject}."
    return category, f"Write a product description for {rng.choice(PRODUCTS)}."


def _math_prompt(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(100, 999)
    kind = rng.randrange(6)
    if kind == 0:
        return f"What is {a} times {b}?"
    if kind == 1:
        return f"What is {c} plus {a * b}? Show your work."
    if kind == 2:
        return f"Solve for x: {a}x + {b} = {c}."
    if kind == 3:
        return f"What is {rng.choice([5, 10, 15, 20, 25, 40])} percent of {c}?"
    if kind == 4:
        return f"Explain how to calculate the {rng.choice(MATH_CONCEPTS)}, with an example."
    return f"A shop sells pencils for {a} cents each. How much do {b} pencils cost in dollars?"


def build_prompts(count: int, seed: int) -> list[str]:
    """``count`` distinct training prompts, the same for the same seed."""
    rng = random.Random(seed)
    seen: set[str] = set()
    prompts: list[str] = []
    attempts = 0
    while len(prompts) < count:
        attempts += 1
        if attempts > count * 200:
            raise ValueError(f"cannot draw {count} distinct prompts; only {len(prompts)} found")
        _, prompt = _render(rng)
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    return prompts


def normalize(text: str) -> str:
    """Lower-case words only, for overlap checks."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def shingles(text: str, size: int) -> set[str]:
    words = normalize(text).split()
    return {" ".join(words[i:i + size]) for i in range(max(0, len(words) - size + 1))}


def assert_disjoint(train_prompts: list[str], heldout_prompts: list[str], shingle_size: int = 6) -> None:
    """Fail if any held-out prompt equals a training prompt or shares a ``shingle_size``-word run with one."""
    train_norm = {normalize(p) for p in train_prompts}
    train_shingles: set[str] = set()
    for prompt in train_prompts:
        train_shingles |= shingles(prompt, shingle_size)
    for prompt in heldout_prompts:
        if normalize(prompt) in train_norm:
            raise AssertionError(f"held-out prompt is also a training prompt: {prompt!r}")
        shared = shingles(prompt, shingle_size) & train_shingles
        if shared:
            raise AssertionError(f"held-out prompt {prompt!r} overlaps training prompts on {sorted(shared)[:3]}")
