"""A varied prompt set for training a feature-level draft head, built offline from what this machine has.

The draft head has to predict what the *verifier* writes, so its training data is the verifier's own
answers to prompts of the kinds users send: chat, writing, code, summarisation, answering from a
passage, translation, maths.  Nothing here comes from Spec-Bench (our benchmark): its questions stay
out of training.  Sources, all local (see ``--help`` of ``scripts/head_data.py``):

* ``magpie``: user turns the verifier writes itself when given only the start of a user message
  (the Magpie trick: the instruct model's own distribution of requests);
* templates over hand-written topic lists (writing, roleplay, STEM, humanities, reasoning, QA, maths
  word problems with random numbers);
* code: functions from the Python standard library's source on this machine;
* passages: the Python documentation sources (Debian ``python3.11-doc``) for summaries, questions
  about a passage and extraction;
* German text to translate: Debian ``fortunes-de``; English quotes to explain: Debian ``fortunes``.

Every prompt is ``{"id", "kind", "turns": [user message, optional follow-up]}``; the follow-up is
sent after the verifier's own first answer, as Spec-Bench's two-turn questions are.
"""
from __future__ import annotations

import ast
import random
import re
from pathlib import Path

DOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
FORTUNES_DE = Path("/usr/share/games/fortunes/de")
FORTUNES_EN = Path("/usr/share/games/fortunes")

TOPICS = """the water cycle; photosynthesis; black holes; the French Revolution; the printing press; vaccines;
climate change; plate tectonics; the Roman Empire; machine learning; the stock market; inflation; democracy;
the immune system; renewable energy; the internet; the Renaissance; DNA replication; volcanoes; the Cold War;
electric cars; the human brain; sleep; coffee; honeybees; the moon landing; ancient Egypt; the Industrial
Revolution; quantum computing; recycling; social media; the Great Depression; earthquakes; rainforests;
the Olympic Games; jazz music; impressionist painting; the theory of evolution; antibiotics; supply and demand;
cryptography; the solar system; ocean currents; migration of birds; the Silk Road; urban gardening;
remote work; public transport; the history of chess; artificial satellites; nuclear fusion; the Byzantine
Empire; coral reefs; minimalism; meditation; volunteering; personal finance; learning a new language;
time management; the Mediterranean diet; 3D printing; blockchain; the Apollo program; glaciers; the Amazon
river; Shakespeare's plays; Greek mythology; the Enlightenment; the human genome; wind turbines; smartphones;
video games; the history of tea; marathons; the periodic table; gravity; the speed of light; thunderstorms;
the ozone layer; the Magna Carta; the Ming dynasty; the Aztec civilization; the invention of the telephone;
open-source software; cloud computing; databases; operating systems; compilers; computer networks;
cybersecurity; the scientific method; statistics; probability; calculus; prime numbers; the Pythagorean
theorem; fractals; game theory; behavioural economics; urbanization; the gig economy; electric grids;
desalination; food waste; composting; the history of the bicycle; public libraries; museums; architecture
of cathedrals; modern dance; film noir; the Beatles; classical music; poetry; science fiction; mountaineering;
gardening; baking bread; dogs as pets; cats; whales; dinosaurs; the Arctic; deserts; the Sahara; the Alps""".replace("\n", " ")

PEOPLE = """Marie Curie; Isaac Newton; Ada Lovelace; Leonardo da Vinci; Nelson Mandela; Albert Einstein; Cleopatra;
Charles Darwin; Frida Kahlo; Alan Turing; Mahatma Gandhi; Jane Austen; Nikola Tesla; Galileo Galilei;
Florence Nightingale; Wolfgang Amadeus Mozart; Abraham Lincoln; Confucius; Rosa Parks; Johannes Gutenberg;
Queen Victoria; Ludwig van Beethoven; Simone de Beauvoir; Grace Hopper; Napoleon Bonaparte; Aristotle""".replace(
    "\n", " ")

ROLES = """a pirate captain; a medieval knight; a detective in 1920s London; a friendly robot; a tour guide in Rome;
a chef in a busy kitchen; an astronaut on Mars; a wise old wizard; a sports commentator; a museum curator;
a ship's cat; a time traveller from the year 3000; a lighthouse keeper; a librarian; a dragon guarding
treasure; a famous detective; a barista; a park ranger; a news anchor; a grumpy mountain troll""".replace("\n", " ")

WRITING = [
    "Write a short story about {topic}.", "Write a poem about {topic}.", "Write a blog post about {topic}.",
    "Write a persuasive essay on {topic}.", "Compose an email to a colleague about {topic}.",
    "Write a product description for a gadget related to {topic}.", "Draft a speech about {topic}.",
    "Write a haiku sequence about {topic}.", "Write a limerick about {topic}.",
    "Write a diary entry from someone who just learned about {topic}.",
    "Write an advertisement for a course on {topic}.", "Write a dialogue between two friends about {topic}.",
]
STEM = [
    "Explain {topic} in simple terms.", "How does {topic} work?", "What are the main causes of {topic}?",
    "Explain {topic} to a ten-year-old.", "What are the advantages and disadvantages of {topic}?",
    "Give me five interesting facts about {topic}.", "What is the history of {topic}?",
    "Why is {topic} important?", "Compare {topic} and {other}.", "What are common misconceptions about {topic}?",
    "Describe the key ideas behind {topic}.", "What would happen if {topic} disappeared?",
]
PEOPLE_T = ["Who was {person}?", "What were the main achievements of {person}?",
            "Write a short biography of {person}.", "What can we learn from the life of {person}?",
            "Imagine an interview with {person}. Write three questions and their answers."]
ROLEPLAY = ["Pretend you are {role}. Describe your typical day.", "You are {role}. Introduce yourself.",
            "Act as {role} and give advice to a newcomer.", "As {role}, tell me about your greatest adventure.",
            "Imagine you are {role}. How do you feel about {topic}?"]
REASONING = [
    "If all {a} are {b} and some {b} are {c}, can we conclude that some {a} are {c}? Explain.",
    "There are {n} people in a room and each shakes hands with every other person once. How many handshakes?",
    ("A train leaves at {h}:00 travelling at {s} km/h. Another leaves an hour later at {s2} km/h on the same "
     "track. When does the second catch up?"),
    "Which is heavier, a kilogram of {a} or a kilogram of {b}? Explain.",
    "What comes next in the sequence {seq}? Explain the pattern.",
]
MATH = [
    "{name} has {x} apples and buys {y} more, then gives away {z}. How many apples does {name} have now?",
    "A shop sells notebooks at ${x} each. {name} buys {y} notebooks and pays with a ${big} bill. How much change?",
    "A rectangle is {x} cm long and {y} cm wide. What are its area and perimeter?",
    "{name} reads {x} pages a day. How many days to finish a book of {big} pages?",
    "A car uses {x} litres of fuel per 100 km. How much fuel for a trip of {big} km?",
    "The price of a jacket is ${big}. It is discounted by {p}%. What is the new price?",
    "{name} saves ${x} every week. How many weeks to save ${big}?",
    "Solve for x: {x}x + {y} = {big}.", "What is {x} multiplied by {y}, plus {z}?",
    "A class has {big} students and {p}% of them passed the exam. How many passed?",
]
QA = ["What is the capital of {country}?", "What language is spoken in {country}?",
      "What is {topic}?", "Name three famous landmarks in {country}.", "What is {country} known for?",
      "When was {topic} first discovered or invented?", "How many continents are there and what are they?",
      "What is the tallest mountain in {country}?", "What currency does {country} use?"]
COUNTRIES = ["France", "Japan", "Brazil", "Kenya", "Canada", "Australia", "India", "Germany", "Mexico", "Egypt", "Norway", "Argentina", "Vietnam", "Italy", "Spain", "Peru", "Morocco", "Thailand", "Poland", "New Zealand", "Chile", "Ireland", "Greece"]
NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Felix", "Grace", "Hugo", "Ines", "Jack", "Lena", "Marco", "Nora", "Omar", "Paula", "Ravi", "Sara", "Tom"]
CODE_T = [
    "Explain what this Python function does:\n\n```python\n{src}\n```",
    "Write a docstring for this function:\n\n```python\n{src}\n```",
    "Add type hints to this function and explain your choices:\n\n```python\n{src}\n```",
    "Write unit tests with pytest for this function:\n\n```python\n{src}\n```",
    "Rewrite this function so that it is easier to read:\n\n```python\n{src}\n```",
    "Are there any bugs or edge cases in this function?\n\n```python\n{src}\n```",
]
CODE_TASK = ["Write a Python function that {task}.", "Implement a function in Python which {task}.",
             "Show me Python code that {task}, with comments.", "How would I write a function that {task}?",
             "Write a JavaScript function that {task}.", "Write a C function that {task}."]
TASKS = """reverses a string; checks whether a number is prime; counts the words in a text file; merges two
sorted lists; finds the largest element of a list; removes duplicates from a list while keeping order;
computes the factorial of n; returns the n-th Fibonacci number; parses a date string; converts Celsius to
Fahrenheit; flattens a nested list; finds the most common word in a sentence; validates an email address;
reads a CSV file into a list of dictionaries; computes the average of a list; sorts a list of dictionaries by
a key; implements binary search; checks whether two strings are anagrams; rotates a matrix by 90 degrees;
implements a stack with push and pop; downloads a web page and counts its links; groups words by their first
letter; computes the greatest common divisor; generates all permutations of a list; converts a number to Roman
numerals; implements a simple LRU cache; checks balanced parentheses; finds the median of a list; compresses a
string with run-length encoding; counts vowels in a string""".replace("\n", " ")
SUMMARY_T = ["Summarize the following text in a few sentences:\n\n{passage}",
             "Give a short summary of this passage:\n\n{passage}",
             "{passage}\n\nSummarize the text above in one paragraph.",
             "Write a TL;DR for the following documentation:\n\n{passage}",
             "Summarize the key points of this text as a bulleted list:\n\n{passage}"]
RAG_T = ["Answer the question using only the passage.\n\nPassage:\n{passage}\n\nQuestion: {question}",
         "{passage}\n\nBased on the text above, {question_lc}",
         "Read the document and answer.\n\nDocument:\n{passage}\n\nQuestion: {question}"]
EXTRACT_T = ["List every technical term mentioned in this text:\n\n{passage}",
             ("Extract the names of all functions, classes and modules mentioned in this text, as a JSON list:"
              "\n\n{passage}"),
             "Extract the main claims of this passage as a numbered list:\n\n{passage}"]
TRANSLATE_T = ["Translate the following German text into English:\n\n{de}",
               "Please translate this into English:\n{de}", "German: {de}\nEnglish translation:",
               "What does this German text mean in English?\n\n{de}"]
QUOTE_T = ["Explain the meaning of this quote:\n\n{quote}", "Do you agree with this saying? Why?\n\n{quote}"]
FOLLOW_UPS = ["Can you make your answer shorter?", "Now explain it to a ten-year-old.",
              "Give me three more examples.", "Rewrite your answer as a bulleted list.",
              "Can you add more detail to the second point?", "Summarize your answer in one sentence.",
              "Write a title for your answer.", "What are the limitations of what you said?",
              "Now rewrite it in a more formal tone.", "Can you give a concrete example?",
              "Translate your answer into simple English for a beginner.",
              "Rewrite it without using the letter 'e' where possible."]


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(";") if t.strip()]


def passages(rng: random.Random, count: int, min_chars: int = 600, max_chars: int = 3400) -> list[tuple[str, str]]:
    """(heading, passage) pairs from the Python documentation's reStructuredText sources."""
    files = sorted(DOC_SOURCES.rglob("*.rst.txt")) if DOC_SOURCES.is_dir() else []
    out: list[tuple[str, str]] = []
    rng.shuffle(files)
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        text = re.sub(r"^\.\. [^\n]*(\n   [^\n]*)*", "", text, flags=re.MULTILINE)  # directives and their options
        text = re.sub(r":[a-z:]+:`~?([^`<]+?)(?: <[^>]+>)?`", r"\1", text)   # :func:`x` -> x
        sections = re.split(r"\n([^\n]+)\n[=\-~^*]{3,}\n", text)
        for i in range(1, len(sections) - 1, 2):
            heading, body = sections[i].strip(), re.sub(r"\n{3,}", "\n\n", sections[i + 1]).strip()
            if len(body) >= min_chars:
                out.append((heading, body[:max_chars].rsplit("\n", 1)[0] if len(body) > max_chars else body))
        if len(out) >= count * 3:
            break
    rng.shuffle(out)
    return out[:count]


def fortunes(folder: Path, rng: random.Random, count: int, max_lines: int = 6) -> list[str]:
    items: list[str] = []
    if folder.is_dir():
        for f in sorted(folder.iterdir()):
            if f.is_file() and not f.suffix and "asciiart" not in f.name and "art" != f.name:
                for chunk in f.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
                    chunk = chunk.strip()
                    if 20 < len(chunk) < 600 and chunk.count("\n") < max_lines:
                        items.append(chunk)
    rng.shuffle(items)
    return items[:count]


def stdlib_functions(rng: random.Random, count: int, min_lines: int = 5, max_lines: int = 40) -> list[tuple[str, str]]:
    """(source, first docstring line) of standard-library functions."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")) if "test" not in p.parts[-2:][0]
             and "test" not in p.name]
    rng.shuffle(files)
    out: list[tuple[str, str]] = []
    for f in files:
        try:
            src = f.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = src.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.end_lineno:
                n = node.end_lineno - node.lineno + 1
                if min_lines <= n <= max_lines:
                    body = "\n".join(lines[node.lineno - 1:node.end_lineno])
                    import textwrap

                    doc = (ast.get_docstring(node) or "").strip().split("\n")[0]
                    out.append((textwrap.dedent(body), doc))
        if len(out) >= count * 4:
            break
    rng.shuffle(out)
    return out[:count]


def build(seed: int = 0, scale: float = 1.0) -> list[dict]:
    """The templated prompts (Magpie prompts are added by head_data.py, which needs the model)."""
    rng = random.Random(seed)
    topics, people, roles, tasks = _split(TOPICS), _split(PEOPLE), _split(ROLES), _split(TASKS)

    def n(x: int) -> int:
        return max(1, int(x * scale))

    prompts: list[tuple[str, str]] = []
    for _ in range(n(500)):
        t, o = rng.sample(topics, 2)
        prompts.append(("stem", rng.choice(STEM).format(topic=t, other=o)))
    for _ in range(n(300)):
        prompts.append(("writing", rng.choice(WRITING).format(topic=rng.choice(topics))))
    for _ in range(n(120)):
        prompts.append(("humanities", rng.choice(PEOPLE_T).format(person=rng.choice(people))))
    for _ in range(n(150)):
        prompts.append(("roleplay", rng.choice(ROLEPLAY).format(role=rng.choice(roles), topic=rng.choice(topics))))
    for _ in range(n(120)):
        a, b, c = rng.sample(["cats", "dogs", "birds", "mammals", "animals", "pets", "feathers", "bricks", "robots"], 3)
        start = rng.randint(1, 9)
        seq = ", ".join(str(start * (i + 1) ** rng.choice([1, 2])) for i in range(5))
        prompts.append(("reasoning", rng.choice(REASONING).format(a=a, b=b, c=c, n=rng.randint(4, 30),
                                                                  h=rng.randint(6, 11), s=rng.randint(50, 90),
                                                                  s2=rng.randint(95, 160), seq=seq)))
    for _ in range(n(350)):
        x, y, z = rng.randint(2, 60), rng.randint(2, 40), rng.randint(1, 20)
        prompts.append(("math", rng.choice(MATH).format(name=rng.choice(NAMES), x=x, y=y, z=min(z, x + y),
                                                        big=rng.randint(100, 900), p=rng.choice([10, 15, 20, 25, 30, 40]))))
    for _ in range(n(250)):
        prompts.append(("qa", rng.choice(QA).format(country=rng.choice(COUNTRIES), topic=rng.choice(topics))))
    for src, doc in stdlib_functions(rng, n(300)):
        prompts.append(("code", rng.choice(CODE_T).format(src=src)))
        if doc and len(doc) > 15 and rng.random() < 0.5:
            task = doc[0].lower() + doc[1:].rstrip(".")
            prompts.append(("code", f"Write a Python function that does the following: {task}."))
    for _ in range(n(250)):
        prompts.append(("code", rng.choice(CODE_TASK).format(task=rng.choice(tasks))))
    docs = passages(rng, n(600))
    for i, (heading, body) in enumerate(docs):
        kind = ("summarization", "rag", "extraction")[i % 3]
        if kind == "summarization":
            text = rng.choice(SUMMARY_T).format(passage=body)
        elif kind == "rag":
            q = rng.choice([f"What does the passage say about {heading}?", f"What is the purpose of {heading}?",
                            f"How is {heading} used, according to the text?", "What is the main point of the passage?"])
            text = rng.choice(RAG_T).format(passage=body, question=q, question_lc=q[0].lower() + q[1:])
        else:
            text = rng.choice(EXTRACT_T).format(passage=body)
        prompts.append((kind, text))
    for de in fortunes(FORTUNES_DE, rng, n(500)):
        prompts.append(("translation", rng.choice(TRANSLATE_T).format(de=de)))
    for quote in fortunes(FORTUNES_EN, rng, n(200)):
        prompts.append(("quotes", rng.choice(QUOTE_T).format(quote=quote)))
    out = []
    for i, (kind, text) in enumerate(prompts):
        turns = [text]
        if kind not in ("translation", "extraction") and rng.random() < 0.25:
            turns.append(rng.choice(FOLLOW_UPS))
        out.append({"id": f"{kind}-{i}", "kind": kind, "turns": turns})
    rng.shuffle(out)
    return out


if __name__ == "__main__":
    import collections
    import json
    import sys

    ps = build()
    print(json.dumps(collections.Counter(p["kind"] for p in ps)), len(ps), file=sys.stderr)
    for p in ps[:5]:
        print(json.dumps(p)[:300])
