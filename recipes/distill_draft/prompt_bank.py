"""Programmatic chat prompts for distilling duo's default draft model.

The training prompts are built from hand-written templates crossed with hand-written slot values
(topics, goals, coding tasks, characters, dishes, places, numbers ...), grouped by 26 weighted categories:
questions, explanations, definitions, lists, comparisons, advice, ideas, stories, poems, code, programming
concepts, SQL/shell, maths and unit conversions, writing, product copy, cooking, travel, troubleshooting, grammar
and rewriting, word meanings, naming, short facts, reading a given passage, riddles and jokes, pros and cons.
``build_prompts`` draws a fixed number of distinct prompts with a seeded RNG, so the same config always yields
the same prompts.

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
    "explanation": ["Explain {topic} in simple terms.", "Explain {topic} to a ten-year-old.",
                    "Give a short explanation of {topic}.", "Describe {topic} in a few paragraphs."],
    "definition": ["Define {topic}.", "What does the term \"{topic}\" mean?", "Give me a definition of {topic}."],
    "list": ["List five facts about {topic}.", "What are the main advantages and disadvantages of {topic}?",
             "Give me a bullet list of key points about {topic}.", "List three common misconceptions about {topic}."],
    "summary": ["Summarize the idea of {topic} in two sentences.", "Write a short paragraph about {topic}."],
}


MORE_TOPICS = [
    "the nervous system", "the digestive system", "allergies", "the common cold", "blood pressure",
    "cholesterol", "caffeine", "hydration", "stretching", "posture", "the placebo effect", "memory",
    "habits", "motivation", "procrastination", "emotional intelligence", "body language", "negotiation",
    "leadership", "teamwork", "remote work", "job interviews", "networking", "personal branding",
    "retirement savings", "index funds", "credit scores", "mortgages", "insurance", "cryptocurrency",
    "small businesses", "marketing", "customer service", "e-commerce", "supply chains", "globalization",
    "the European Union", "the United Nations", "the Industrial Age", "the Bronze Age", "the Vikings",
    "the Aztec Empire", "the Ottoman Empire", "the Ming dynasty", "the American Revolution",
    "the Apollo program", "the Space Race", "the invention of the telephone", "the steam engine",
    "the Wright brothers", "penicillin", "the microscope", "the telescope", "the compass",
    "paper money", "the alphabet", "the calendar", "clocks", "maps", "lighthouses", "bridges",
    "skyscrapers", "tunnels", "dams", "canals", "railways", "highways", "public transport", "bicycles",
    "sailing", "submarines", "hot air balloons", "drones", "self-driving cars", "batteries", "wind turbines",
    "hydroelectric power", "geothermal energy", "fossil fuels", "air pollution", "water pollution",
    "plastic waste", "biodiversity", "endangered species", "bees", "ants", "butterflies", "bats", "owls",
    "penguins", "octopuses", "sharks", "elephants", "wolves", "camels", "migration of birds",
    "hibernation", "photosynthesis in algae", "fungi", "mushrooms", "soil", "rivers", "mountains",
    "caves", "islands", "wetlands", "the Sahara", "Antarctica", "the Arctic", "the Himalayas",
    "the Nile", "the Mediterranean Sea", "monsoons", "thunderstorms", "lightning", "snowflakes", "fog",
    "the seasons", "time zones", "leap years", "the equator", "latitude and longitude", "the Big Bang",
    "galaxies", "the Milky Way", "comets", "the sun", "Mars", "Jupiter", "Saturn's rings", "eclipses",
    "gravity on the moon", "astronauts", "the International Space Station", "telescopes in space",
    "sound waves", "light", "color", "temperature", "friction", "energy", "momentum", "buoyancy",
    "pressure", "magnets", "static electricity", "circuits", "semiconductors", "lasers", "radio",
    "television", "the telegraph", "email", "search engines", "web browsers", "programming languages",
    "algorithms", "data structures", "open source software", "version control", "cybersecurity",
    "passwords", "encryption", "phishing", "backups", "spreadsheets", "virtual reality", "video games",
    "animation", "film making", "theater", "opera", "ballet", "hip hop", "classical music", "the guitar",
    "the violin", "drums", "singing", "poetry", "novels", "fairy tales", "mythology", "Greek gods",
    "Shakespeare", "libraries", "museums", "architecture", "gothic cathedrals", "pyramids",
    "sculpture", "pottery", "knitting", "woodworking", "gardening", "houseplants", "bonsai trees",
    "beekeeping", "fishing", "hiking", "camping", "rock climbing", "skiing", "surfing", "yoga",
    "marathons", "soccer", "basketball", "tennis", "baseball", "cricket", "the Tour de France",
    "table tennis", "swimming", "martial arts", "board games", "card games", "puzzles", "magic tricks",
    "etiquette", "table manners", "tipping", "holidays around the world", "New Year traditions",
    "weddings", "birthdays", "languages of the world", "sign language", "dialects", "idioms",
    "punctuation", "grammar", "spelling", "handwriting", "speed reading", "note taking",
    "critical thinking", "logical fallacies", "the scientific method", "statistics", "probability",
    "percentages", "fractions", "prime numbers", "geometry", "algebra", "calculus", "infinity",
    "the number zero", "pi", "negative numbers", "fermentation", "cheese making", "spices", "tea ceremonies",
    "street food", "vegetarian diets", "food allergies", "sugar", "salt", "olive oil", "rice", "pasta",
    "sourdough", "barbecue", "sushi", "curry", "chocolate making", "coffee roasting", "wine making",
]

AUDIENCES = [
    "to a complete beginner", "to a high school student", "to a busy parent", "to my grandmother",
    "to a five-year-old", "in one paragraph", "in plain language", "using an everyday analogy",
    "as if I were a new employee", "in three short points", "without any jargon", "to someone who loves sports",
]

QUESTION_TEMPLATES = [
    "What is {topic}?", "How does {topic} work?", "Why is {topic} important?", "Can you tell me about {topic}?",
    "What are the most interesting facts about {topic}?", "What is the history of {topic}?",
    "What are common myths about {topic}?", "How has {topic} changed over time?",
    "What should everyone know about {topic}?", "What are the basics of {topic}?",
    "Who should learn about {topic}, and why?", "What are the biggest open questions about {topic}?",
    "How would you describe {topic} in one sentence?", "What is the most surprising thing about {topic}?",
    "What are the benefits of understanding {topic}?", "Where can I see {topic} in everyday life?",
    "What are the key terms I need to know about {topic}?", "How do scientists study {topic}?",
    "What are some fun facts about {topic} for kids?", "What problems does {topic} cause or solve?",
]

EXPLAIN_TEMPLATES = [
    "Explain {topic} {audience}.", "Can you explain {topic} {audience}?", "Describe {topic} {audience}.",
    "Help me understand {topic} {audience}.", "Teach me about {topic} {audience}.",
]

LIST_TEMPLATES = [
    "List {n} facts about {topic}.", "Give me {n} key points about {topic}.",
    "What are {n} things most people do not know about {topic}?", "List {n} questions a student might ask about {topic}.",
    "Name {n} important ideas related to {topic}.", "Give me {n} reasons to learn about {topic}.",
    "List {n} words related to {topic} and define each one.", "Write {n} quiz questions about {topic}, with answers.",
]

NUMBER_WORDS = ["three", "four", "five", "six", "seven", "eight", "ten"]

SITUATIONS = [
    "I am a college student", "I work from home", "I have two young kids", "I just moved to a new country",
    "I work night shifts", "I am over sixty", "I have very little free time", "I live in a small apartment",
    "I am on a tight budget", "I get bored easily", "I am starting a new job next week", "I travel a lot for work",
]

MORE_GOALS = [
    "build a morning routine", "save for a vacation", "pay off a credit card", "learn to draw",
    "get better at chess", "improve my handwriting", "memorize things faster", "make my resume stand out",
    "ask for a raise", "give a good presentation", "deal with a difficult coworker", "set boundaries with family",
    "spend less time on my phone", "cook more at home", "meal prep for the week", "start lifting weights",
    "stretch every day", "run a 5k", "sleep through the night", "stop snacking late at night",
    "learn touch typing", "keep my desk tidy", "plan my week", "write a novel", "start a podcast",
    "grow tomatoes on a balcony", "learn basic car maintenance", "become more patient", "make small talk",
    "handle criticism", "stay motivated when learning alone", "study for a math test", "practice mindfulness",
    "reduce food waste", "live more sustainably", "teach my child to read", "get my kids to eat vegetables",
    "choose a laptop", "back up my photos", "protect my online accounts", "learn photography",
    "write better emails", "take better notes in class", "prepare for a marathon", "host a dinner party",
]

ADVICE_TEMPLATES = [
    "How can I {goal}?", "Give me some advice on how to {goal}.", "What are some tips to {goal}?",
    "I want to {goal}. Where should I start?", "{situation}. How can I {goal}?",
    "{situation} and I want to {goal}. Any tips?", "What is a simple plan to {goal}?",
    "What mistakes should I avoid when I try to {goal}?", "Make me a one-week plan to {goal}.",
    "{situation}. What is the easiest way to {goal}?",
]

DISHES = [
    "pancakes", "an omelette", "banana bread", "vegetable soup", "fried rice", "guacamole", "hummus",
    "a tomato pasta sauce", "chili", "a lentil curry", "roast chicken", "a green salad", "mashed potatoes",
    "chocolate chip cookies", "a fruit smoothie", "overnight oats", "tacos", "a stir-fry", "pizza dough",
    "a simple cake", "lemonade", "iced tea", "scrambled eggs", "a grilled cheese sandwich", "pumpkin soup",
    "apple pie", "falafel", "a quiche", "risotto", "pad thai", "dumplings", "a burrito bowl", "granola",
    "muffins", "a vegetable lasagna", "garlic bread", "a bean salad", "french toast", "a chicken wrap",
]

COOKING_TEMPLATES = [
    "How do I make {dish}?", "Give me a recipe for {dish}.", "What do I need to make {dish}{twist}?",
    "Write a simple recipe for {dish}{twist}.", "What are common mistakes when making {dish}?",
    "How can I make {dish} healthier?", "Give me step-by-step instructions for {dish}{twist}.",
    "What goes well with {dish}?",
]

RECIPE_TWISTS = ["", " for two people", " without an oven", " in under 20 minutes", " on a budget", " for kids",
                 " without eggs", " for a crowd"]

DESTINATIONS = [
    "Paris", "Rome", "Tokyo", "New York", "London", "Barcelona", "Lisbon", "Istanbul", "Cairo", "Sydney",
    "Mexico City", "Buenos Aires", "Cape Town", "Bangkok", "Seoul", "Vienna", "Prague", "Amsterdam",
    "Iceland", "the Scottish Highlands", "the Swiss Alps", "Kyoto", "Vancouver", "Marrakech", "Peru",
    "Vietnam", "Greece", "Norway", "New Zealand", "Costa Rica", "a national park", "the countryside",
]

TRAVEL_TEMPLATES = [
    "Plan a {days}-day trip to {place}.", "What should I see in {place} if I only have {days} days?",
    "What should I pack for a trip to {place}?", "Give me travel tips for visiting {place}.",
    "What is the best time of year to visit {place}?", "Suggest a budget itinerary for {days} days in {place}.",
    "What local foods should I try in {place}?", "How can I get around cheaply in {place}?",
]

PROBLEMS = [
    ("my phone battery", "drains very quickly"), ("my Wi-Fi", "keeps disconnecting"),
    ("my computer", "is running slowly"), ("my printer", "will not print"), ("my bike chain", "keeps falling off"),
    ("my sourdough", "is not rising"), ("my houseplant", "has yellow leaves"), ("my car", "makes a squeaking noise"),
    ("my kitchen sink", "drains slowly"), ("my headphones", "only work on one side"),
    ("my dog", "barks at every visitor"), ("my cat", "scratches the sofa"), ("my washing machine", "smells bad"),
    ("my email", "is full of spam"), ("my code", "throws a null pointer error"), ("my website", "loads slowly"),
    ("my shoes", "give me blisters"), ("my tomato plants", "are not producing fruit"),
    ("my smoke alarm", "keeps beeping"), ("my fridge", "is making ice on the back wall"),
    ("my tablet", "will not charge"), ("my Python script", "runs out of memory"), ("my toddler", "will not nap"),
    ("my rice", "always comes out sticky"), ("my front door", "is hard to lock"),
]

SENTENCES = [
    "me and him goes to the store every day", "the meeting have been moved to tomorrow afternoon",
    "their going to announce the results next week", "I could of finished the report if I had more time",
    "the data shows that sales is increasing", "she dont like coffee but she drink tea",
    "we was planning to leave early but it rained", "the team are working hard on there project",
    "our product is very unique and the best", "I am writing to inform you that your order is late",
    "the cat sat on the mat and looked out the window", "please find attached the document you asked for",
    "we need to leverage synergies to move the needle", "this software is easy to use and it is very fast",
    "the weather was bad so the game was cancelled", "he runs faster than anyone in his class",
]

SENTENCE_TEMPLATES = [
    "Correct the grammar in this sentence: \"{sentence}\"", "Rewrite this sentence to sound more formal: \"{sentence}\"",
    "Rewrite this sentence in simpler words: \"{sentence}\"", "Make this sentence more friendly: \"{sentence}\"",
    "Is this sentence correct? \"{sentence}\"", "Rewrite this sentence in the passive voice: \"{sentence}\"",
    "Translate this sentence into French: \"{sentence}\"", "Translate this sentence into Spanish: \"{sentence}\"",
    "What is the subject of this sentence? \"{sentence}\"", "Shorten this sentence: \"{sentence}\"",
]

WORDS = [
    "serendipity", "ubiquitous", "ephemeral", "resilience", "ambiguous", "pragmatic", "nostalgia",
    "empathy", "paradox", "irony", "metaphor", "hypothesis", "algorithm", "bandwidth", "momentum",
    "catalyst", "equilibrium", "sustainability", "meticulous", "eloquent", "candid", "diligent",
    "benevolent", "frugal", "gregarious", "inevitable", "obsolete", "pristine", "tenacious", "whimsical",
]

WORD_TEMPLATES = [
    "What does \"{word}\" mean?", "Use the word \"{word}\" in three sentences.", "What are synonyms for \"{word}\"?",
    "What is the opposite of \"{word}\"?", "Where does the word \"{word}\" come from?",
    "Explain the word \"{word}\" to a child.",
]

NAMING_SUBJECTS = [
    "a coffee shop", "a bakery", "a podcast about history", "a tech startup", "a book club", "a hiking group",
    "a children's book", "a fantasy novel", "a mobile game", "a puppy", "a kitten", "a sailing boat",
    "a band", "a gardening blog", "a cooking channel", "a fitness app", "a bookshop", "a food truck",
    "a charity run", "a science club", "a travel blog", "a robot", "a spaceship", "a new board game",
]

NAMING_TEMPLATES = [
    "Suggest {n} names for {subject}.", "Give me {n} catchy slogans for {subject}.",
    "Brainstorm {n} ideas for a logo for {subject}.", "Suggest {n} titles for a blog post about {subject}.",
    "Write a short tagline for {subject}.", "Write a one-paragraph introduction for {subject}.",
]

FACT_QUESTIONS = [
    "Who invented the light bulb?", "Who painted the Mona Lisa?", "When did the Second World War end?",
    "What is the capital of Australia?", "What is the largest ocean on Earth?", "How far is the Moon from Earth?",
    "Who wrote Pride and Prejudice?", "What is the tallest mountain in the world?", "How many bones are in the human body?",
    "What is the boiling point of water in Fahrenheit?", "Who was the first person to walk on the Moon?",
    "What language is spoken in Brazil?", "What is the smallest planet in the solar system?",
    "How many continents are there?", "What is the chemical symbol for gold?", "Who discovered gravity?",
    "What is the longest river in the world?", "When was the internet invented?", "What is the capital of Canada?",
    "Who composed the Four Seasons?", "How many players are on a soccer team?", "What is the hardest natural material?",
    "What gas do plants absorb from the air?", "Who was Cleopatra?", "Who was Isaac Newton?", "Who was Marie Curie?",
    "Who was Leonardo da Vinci?", "Who was Nelson Mandela?", "Who was Albert Einstein?", "Who was Frida Kahlo?",
    "What is the capital of Japan?", "What is the largest desert in the world?", "How old is the universe?",
    "What is the speed of sound?", "Why is the sky blue?", "Why do leaves change color in autumn?",
    "Why do cats purr?", "Why do we dream?", "Why is the ocean salty?", "How do airplanes stay in the air?",
    "How do vaccines train the immune system?", "How does a refrigerator keep food cold?",
    "How do solar panels make electricity?", "How does a compass work?", "How do fish breathe underwater?",
    "How do birds know where to migrate?", "How is glass made?", "How is paper made?", "How are rainbows formed?",
]

FACT_FOLLOWUPS = ["", " Explain briefly.", " Give a short answer.", " Please explain in simple terms.",
                  " Answer in two sentences.", " Include one interesting detail."]

MORE_CHARACTERS = [
    "a grumpy cat", "a tiny turtle", "a nervous astronaut", "a kind giant", "a young chef", "a runaway balloon",
    "a mermaid", "an old clockmaker", "a pirate captain", "a curious owl", "a city pigeon", "a snowman",
    "a teenage hacker", "a traveling musician", "a brave firefighter", "a robot gardener", "a lonely whale",
    "a forgetful wizard", "a shy unicorn", "a determined ant",
]

MORE_EVENTS = [
    "wants to see the ocean", "builds a treehouse", "finds a lost kitten", "tries to win a baking contest",
    "gets stuck in an elevator", "learns a secret about their family", "runs for class president",
    "discovers they can talk to animals", "has to save the school play", "wakes up in a different century",
    "finds a key that opens every door", "goes on a treasure hunt", "starts a band", "climbs a mountain",
    "is afraid of the dark", "plants a magic seed", "gets a strange letter", "joins a circus",
]

STORY_TEMPLATES = [
    "Write a short story about {c} who {e}.", "Tell me a story about {c} who {e}.",
    "Write the opening of a children's story about {c} who {e}.", "Write a funny story about {c} who {e}.",
    "Write a sad story about {c} who {e}.", "Write a 100-word story about {c} who {e}.",
    "Write a dialogue between {c} and {c2}.", "Write a story for kids about {c} who {e}, with a moral.",
    "Give me a plot outline for a story about {c} who {e}.",
]

POEM_FORMS = ["a poem", "a short poem", "a haiku", "a rhyming poem", "a limerick", "a sonnet", "a free verse poem",
              "a funny poem", "an acrostic poem", "a two-stanza poem"]

MORE_POEM_SUBJECTS = [
    "a lost umbrella", "the last day of school", "a train journey", "a sleepy dog", "the desert at noon",
    "a thunderstorm", "an old photograph", "the smell of coffee", "a city park", "the moon", "a candle",
    "growing older", "a summer evening", "a broken clock", "the sea at dawn", "bicycles", "a farmer's market",
]

MORE_CODE_TASKS = [
    "counts the words in a string", "finds the longest word in a sentence", "checks whether a year is a leap year",
    "converts a string to title case", "returns the n-th prime number", "computes the median of a list",
    "rotates a list by k positions", "checks whether brackets in a string are balanced",
    "parses a date string and prints the weekday", "builds a frequency table of characters",
    "implements a stack", "implements a queue using two stacks", "finds all pairs in a list that sum to a target",
    "computes the power set of a set", "converts Roman numerals to integers", "implements bubble sort",
    "implements quicksort", "reverses a linked list", "counts the lines in all files of a folder",
    "prints a multiplication table", "simulates rolling two dice 1000 times",
    "computes compound interest", "validates a phone number", "removes punctuation from a string",
    "finds the intersection of two lists", "checks whether a string contains only digits",
    "merges two dictionaries", "computes the running total of a list", "finds the mode of a list",
]

MORE_LANGUAGES = ["TypeScript", "C++", "Kotlin", "Ruby", "PHP", "Swift", "C#", "Bash"]

CODE_TEMPLATES = [
    "Write a {lang} function that {task}.", "Show me {lang} code that {task}.",
    "Write a {lang} function that {task}, and explain how it works.", "How would I write a {lang} program that {task}?",
    "Write a {lang} function that {task}. Add comments.", "Write a {lang} function that {task}, with a short test.",
]

CODE_CONCEPTS = [
    "a variable", "a loop", "a function", "recursion", "a class", "inheritance", "an interface", "a closure",
    "a callback", "a promise", "async and await", "a hash map", "a linked list", "a binary tree", "big O notation",
    "a pointer", "garbage collection", "a race condition", "a deadlock", "an API", "a REST endpoint", "JSON",
    "a regular expression", "unit testing", "a git branch", "a merge conflict", "a database index", "a SQL join",
    "a foreign key", "a virtual machine", "a container", "caching", "a memory leak", "an exception",
]

CODE_CONCEPT_TEMPLATES = [
    "What is {concept} in programming?", "Explain {concept} with a short code example.",
    "When should I use {concept}?", "What are common mistakes with {concept}?",
    "Explain {concept} to someone who is new to programming.",
]

SQL_SHELL_TASKS = [
    "Write a SQL query that counts the orders per customer.", "Write a SQL query that finds duplicate email addresses.",
    "Write a SQL query that lists products that have never been ordered.",
    "Write a SQL query that computes the average salary per department.",
    "Write a SQL statement that creates a table for books with title, author and year.",
    "Show me SQL to get the latest order of every customer.",
    "Write a bash command that finds all files larger than 100 MB.", "Write a bash script that renames all .txt files to .md.",
    "Write a bash one-liner that counts how many times each IP address appears in a log file.",
    "How do I list hidden files in a Linux terminal?", "How do I undo the last git commit?",
    "How do I create a new git branch and switch to it?", "Write a simple HTML page with a heading and a list.",
    "Write CSS that centers a div horizontally and vertically.", "Write an HTML form with a name and an email field.",
    "How do I make a button change color when the mouse is over it, using CSS?",
]

CONVERSIONS = [
    ("kilometres", "miles"), ("miles", "kilometres"), ("pounds", "kilograms"), ("kilograms", "pounds"),
    ("degrees Fahrenheit", "degrees Celsius"), ("degrees Celsius", "degrees Fahrenheit"), ("inches", "centimetres"),
    ("litres", "gallons"), ("cups", "millilitres"), ("hours", "seconds"), ("feet", "metres"), ("ounces", "grams"),
]

MORE_WRITING = [
    "a thank-you note to my teacher", "a birthday message for my best friend", "a toast for my parents' anniversary",
    "a resignation letter", "a short bio for my social media profile", "an apology to a customer",
    "a welcome message for new team members", "a reminder about an upcoming deadline", "an invitation to a barbecue",
    "a complaint about a late delivery", "a review of a restaurant I enjoyed", "a speech for a graduation",
    "a farewell message for a colleague", "a request for a letter of recommendation", "a LinkedIn summary for a nurse",
    "a motivational message for a sports team", "a condolence note", "a short announcement about a new product",
]

WRITING_TEMPLATES = [
    "Write {piece}.", "Help me write {piece}.", "Draft {piece}. Keep it short.", "Write {piece} in a warm tone.",
    "Write {piece} in a professional tone.",
]

PASSAGES = [
    "The city council voted on Monday to build a new public library downtown. Construction will begin next spring "
    "and is expected to take two years. The library will include a children's wing and a rooftop garden.",
    "Honey never spoils because it has very little water and is naturally acidic. Archaeologists have found pots of "
    "honey in ancient tombs that were still safe to eat after thousands of years.",
    "Our team finished the first version of the app two weeks early. Users liked the simple design, but several of "
    "them asked for a dark mode and for faster search. We plan to add both in the next release.",
    "Regular walking can lower blood pressure, improve mood and help people sleep better. Experts suggest about "
    "thirty minutes a day, which can be split into shorter walks.",
    "The museum will be closed on Tuesday for maintenance. Visitors with tickets for that day can use them on any "
    "other day this month or ask for a refund at the front desk.",
    "Solar panels turn sunlight into electricity using layers of silicon. When light hits the panel, it knocks "
    "electrons loose, and that flow of electrons is an electric current.",
    "Maria started learning the piano at the age of forty. She practiced for twenty minutes every morning before "
    "work, and after a year she played her first small concert for her friends.",
    "The new bus line connects the university with the train station every ten minutes. Students can ride for free "
    "with their student card, while other passengers pay the normal fare.",
]

PASSAGE_TEMPLATES = [
    "Summarize this text in one sentence: {text}", "What is the main idea of this text? {text}",
    "Write three questions about this text: {text}", "Rewrite this text for a ten-year-old: {text}",
    "Give this text a good headline: {text}", "List the key facts in this text: {text}",
]

RIDDLE_PROMPTS = [
    "Tell me a joke about computers.", "Tell me a joke about cats.", "Tell me a clean joke for kids.",
    "Tell me a riddle and its answer.", "Give me three riddles for a party.", "Tell me a pun about food.",
    "Tell me a joke about math.", "Write a knock-knock joke.", "Give me a brain teaser for adults.",
    "If I have three apples and you take away two, how many apples do you have?",
    "A farmer has 17 sheep and all but 9 run away. How many are left?",
    "What comes next in the sequence 2, 4, 8, 16?", "What comes next in the sequence 1, 1, 2, 3, 5, 8?",
    "Which is heavier, a kilogram of feathers or a kilogram of steel?",
]

PRO_CON_SUBJECTS = [
    "working from home", "living in a big city", "electric cars", "online classes", "social media for teenagers",
    "getting a pet", "buying a used car", "learning two languages at once", "studying abroad", "a four-day work week",
    "homeschooling", "nuclear energy", "self-checkout machines", "open-plan offices", "owning a smartphone",
    "renting furniture", "freelancing", "taking a gap year", "living alone", "eating only local food",
]

PRO_CON_TEMPLATES = [
    "What are the pros and cons of {subject}?", "Is {subject} a good idea?", "Give me arguments for and against {subject}.",
    "Write a short persuasive paragraph in favor of {subject}.", "What are the risks of {subject}?",
]

CATEGORY_WEIGHTS = {
    "question": 8, "explanation": 7, "definition": 2, "list": 6, "summary": 2, "comparison": 3, "advice": 8,
    "ideas": 2, "story": 6, "poem": 4, "code": 8, "code_concept": 4, "sql_shell": 1, "math": 4, "writing": 5,
    "product": 1, "cooking": 4, "travel": 3, "troubleshooting": 3, "sentence": 3, "word": 2, "naming": 3,
    "fact": 3, "passage": 2, "riddle": 1, "pros_cons": 3,
}

ALL_TOPICS = TOPICS + MORE_TOPICS


def _render(rng: random.Random) -> tuple[str, str]:
    """One random (category, prompt) pair; categories are drawn with ``CATEGORY_WEIGHTS``."""
    category = rng.choices(list(CATEGORY_WEIGHTS), weights=list(CATEGORY_WEIGHTS.values()))[0]
    return category, RENDERERS[category](rng)


def _single(category: str):
    return lambda rng: rng.choice(SINGLE_TEMPLATES[category]).format(topic=rng.choice(ALL_TOPICS))


def _question(rng: random.Random) -> str:
    return rng.choice(QUESTION_TEMPLATES).format(topic=rng.choice(ALL_TOPICS))


def _explanation(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return _single("explanation")(rng)
    return rng.choice(EXPLAIN_TEMPLATES).format(topic=rng.choice(ALL_TOPICS), audience=rng.choice(AUDIENCES))


def _list(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return _single("list")(rng)
    return rng.choice(LIST_TEMPLATES).format(n=rng.choice(NUMBER_WORDS), topic=rng.choice(ALL_TOPICS))


def _comparison(rng: random.Random) -> str:
    a, b = rng.choice(COMPARISON_PAIRS)
    if rng.random() < 0.5:
        a, b = b, a
    template = rng.choice(["Compare {a} and {b}.", "What is the difference between {a} and {b}?",
                           "How are {a} and {b} similar, and how are they different?",
                           "Which is better, {a} or {b}? Explain.", "Make a table comparing {a} and {b}."])
    return template.format(a=a, b=b)


def _advice(rng: random.Random) -> str:
    goal = rng.choice(GOALS + MORE_GOALS)
    return rng.choice(ADVICE_TEMPLATES).format(goal=goal, situation=rng.choice(SITUATIONS))


def _ideas(rng: random.Random) -> str:
    template = rng.choice(["Give me {n} ideas for {a}.", "Brainstorm {n} themes for {a}.",
                           "What are {n} fun things to do for {a}?", "Suggest {n} cheap ideas for {a}."])
    return template.format(n=rng.choice(NUMBER_WORDS), a=rng.choice(ACTIVITIES))


def _story(rng: random.Random) -> str:
    characters = CHARACTERS + MORE_CHARACTERS
    c, c2 = rng.sample(characters, 2)
    return rng.choice(STORY_TEMPLATES).format(c=c, c2=c2, e=rng.choice(EVENTS + MORE_EVENTS))


def _poem(rng: random.Random) -> str:
    form = rng.choice(POEM_FORMS)
    subject = rng.choice(POEM_SUBJECTS + MORE_POEM_SUBJECTS)
    return rng.choice(["Write {f} about {s}.", "Compose {f} about {s}.", "Can you write {f} about {s}?"]).format(
        f=form, s=subject)


def _code(rng: random.Random) -> str:
    task = rng.choice(CODE_TASKS + MORE_CODE_TASKS)
    return rng.choice(CODE_TEMPLATES).format(lang=rng.choice(LANGUAGES + MORE_LANGUAGES), task=task)


def _code_concept(rng: random.Random) -> str:
    concept = rng.choice(CODE_CONCEPTS)
    if rng.random() < 0.3:
        return f"Explain {concept} in {rng.choice(LANGUAGES + MORE_LANGUAGES)}."
    return rng.choice(CODE_CONCEPT_TEMPLATES).format(concept=concept)


def _writing(rng: random.Random) -> str:
    if rng.random() < 0.3:
        recipient, subject = rng.choice(WRITING_TASKS)
        return f"Write a {rng.choice(['short', 'polite', 'friendly', 'formal'])} email to {recipient} about {subject}."
    return rng.choice(WRITING_TEMPLATES).format(piece=rng.choice(MORE_WRITING))


def _product(rng: random.Random) -> str:
    template = rng.choice(["Write a product description for {p}.", "Write a short ad for {p}.",
                           "What should I look for when buying {p}?", "Write a customer review of {p}."])
    return template.format(p=rng.choice(PRODUCTS))


def _cooking(rng: random.Random) -> str:
    return rng.choice(COOKING_TEMPLATES).format(dish=rng.choice(DISHES), twist=rng.choice(RECIPE_TWISTS))


def _travel(rng: random.Random) -> str:
    return rng.choice(TRAVEL_TEMPLATES).format(place=rng.choice(DESTINATIONS), days=rng.choice([2, 3, 4, 5, 7, 10]))


def _troubleshooting(rng: random.Random) -> str:
    thing, problem = rng.choice(PROBLEMS)
    template = rng.choice(["{Thing} {problem}. What should I do?", "How can I fix it when {thing} {problem}?",
                           "{Thing} {problem}. What are the likely causes?", "{Thing} {problem}. Can you help?"])
    return template.format(Thing=thing[0].upper() + thing[1:], thing=thing, problem=problem)


def _sentence(rng: random.Random) -> str:
    return rng.choice(SENTENCE_TEMPLATES).format(sentence=rng.choice(SENTENCES))


def _word(rng: random.Random) -> str:
    return rng.choice(WORD_TEMPLATES).format(word=rng.choice(WORDS))


def _naming(rng: random.Random) -> str:
    return rng.choice(NAMING_TEMPLATES).format(n=rng.choice(NUMBER_WORDS[:4]), subject=rng.choice(NAMING_SUBJECTS))


def _fact(rng: random.Random) -> str:
    return rng.choice(FACT_QUESTIONS) + rng.choice(FACT_FOLLOWUPS)


def _passage(rng: random.Random) -> str:
    return rng.choice(PASSAGE_TEMPLATES).format(text=rng.choice(PASSAGES))


def _riddle(rng: random.Random) -> str:
    return rng.choice(RIDDLE_PROMPTS)


def _pros_cons(rng: random.Random) -> str:
    return rng.choice(PRO_CON_TEMPLATES).format(subject=rng.choice(PRO_CON_SUBJECTS))


def _sql_shell(rng: random.Random) -> str:
    return rng.choice(SQL_SHELL_TASKS)


def _math(rng: random.Random) -> str:
    if rng.random() < 0.15:
        source, unit = rng.choice(CONVERSIONS)
        return f"How many {unit} are in {rng.randint(2, 500)} {source}?"
    return _math_prompt(rng)


RENDERERS = {
    "question": _question, "explanation": _explanation, "definition": _single("definition"), "list": _list,
    "summary": _single("summary"), "comparison": _comparison, "advice": _advice, "ideas": _ideas, "story": _story,
    "poem": _poem, "code": _code, "code_concept": _code_concept, "sql_shell": _sql_shell, "math": _math,
    "writing": _writing, "product": _product, "cooking": _cooking, "travel": _travel,
    "troubleshooting": _troubleshooting, "sentence": _sentence, "word": _word, "naming": _naming, "fact": _fact,
    "passage": _passage, "riddle": _riddle, "pros_cons": _pros_cons,
}


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
